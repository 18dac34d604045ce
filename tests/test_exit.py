"""Processes that outlive ``fit`` (the Trainer's default launcher re-runs the script for the other
ranks, torchrun workers) close gloo at interpreter exit: a rank that exits with the group still open can
abort ("terminate called without an active exception") once its peer has gone."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import free_port

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    import torch, lightning as L, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from lightning_desloc import DeslocStrategy
    from helpers import Regression

    out = sys.argv[1]

    def report():  # registered before the strategy's hook, so it runs after it (atexit is LIFO)
        rank = os.environ.get("LOCAL_RANK", "0")
        with open(os.path.join(out, f"rank{{rank}}.txt"), "w") as f:
            f.write("open" if dist.is_initialized() else "closed")

    atexit.register(report)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DeslocStrategy(param_sync_every=2), max_steps=4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(Regression(n_batches=4))
    assert dist.is_initialized()  # still open after fit: the user's script may go on (test, predict)
""")


def test_default_launcher_ranks_close_the_process_group_at_exit(tmp_path: Path):
    script = tmp_path / "fit_then_exit.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "closed"
    assert (tmp_path / "rank1.txt").read_text() == "closed"
