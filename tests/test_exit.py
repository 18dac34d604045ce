"""Processes that outlive ``fit`` (the Trainer's default launcher re-runs the script for the other
ranks, torchrun workers) close gloo at interpreter exit: a rank that exits with the group still open can
abort ("terminate called without an active exception") once its peer has gone."""

import os
import signal
import subprocess
import sys
import textwrap
import time
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


FAILING_RANK = textwrap.dedent("""
    import os, sys
    import lightning as L, torch
    sys.path.insert(0, {tests!r})
    from lightning_desloc import DeslocStrategy
    from helpers import Regression

    class FailsOnRankOne(Regression):
        def training_step(self, batch, batch_idx):
            if self.global_rank == 1 and batch_idx == 4:
                raise RuntimeError("injected failure on rank 1")
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DeslocStrategy(param_sync_every=8), max_steps=40,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(FailsOnRankOne(n_batches=40))
""")


def test_an_exception_on_one_rank_ends_every_rank_quickly(tmp_path: Path):
    """The exit path never waits on a peer that may sit in another collective: an exception on rank 1 ends
    the job with an error in seconds (plain DDP: ~10 s), not after the process group's timeout."""
    script = tmp_path / "fails_on_rank_one.py"
    script.write_text(FAILING_RANK.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's child (rank 1) is in the same session
        output, _ = proc.communicate()
        raise AssertionError(f"the job still ran 120 s after rank 1 failed:\n{output[-3000:]}")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1" in output, output[-3000:]
    assert elapsed < 90, f"{elapsed:.0f} s"
