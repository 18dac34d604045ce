"""Helpers for benchmarks that run the GPT example (``examples/gpt/train.py``) as a subprocess.

* :func:`gpt_argv` builds the LightningCLI command line from one of the three configs plus overrides.
* :func:`ensure_data` prepares the corpus once, in this process, before any multi-process run (so that
  two "nodes" never prepare the same directory at the same time).
* :func:`read_metrics` reads a run's ``metrics.csv`` into validation points, training-loss points and the
  bytes sent by each step (:func:`common.bytes_sent_by_step`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bytes_sent_by_step, read_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "gpt" / "train.py"
CONFIGS = {"ddp": "configs/gpt-tiny-ddp.yaml", "local-adam": "configs/gpt-tiny-local-adam.yaml",
           "desloc": "configs/gpt-tiny-desloc.yaml"}

#: a one-layer, width-32 GPT and a small corpus for ``--smoke``
SMOKE_MODEL = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.warmup_steps=2"]
SMOKE_DATA_BYTES = 300_000
SMOKE_VAL_EVERY = 4


def ensure_data(data_dir: str | Path, max_bytes: int, block_size: int = 128, val_every: int = 20) -> None:
    if (Path(data_dir) / "corpus.json").exists():
        return
    subprocess.run([sys.executable, str(REPO / "examples" / "gpt" / "prepare.py"), "--data_dir", str(data_dir),
                    "--max_bytes", str(max_bytes), "--block_size", str(block_size), "--val_every", str(val_every)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def gpt_argv(config: str, *, save_dir: str | Path, name: str, k: Optional[int | str] = None, extra: tuple[str, ...] = (),
             ckpt_path: Optional[str] = None) -> list[str]:
    """``python examples/gpt/train.py fit --config configs/gpt-tiny-CONFIG.yaml`` with a CSV logger at
    ``save_dir/name/version_0`` and, for the DES-LOC configs, ``K`` (Local Adam: ``K`` for all states
    too)."""
    argv = [sys.executable, str(TRAIN), "fit", "--config", str(REPO / CONFIGS[config]),
            f"--trainer.logger.init_args.save_dir={save_dir}", f"--trainer.logger.init_args.name={name}",
            "--trainer.logger.init_args.version=0"]
    if k is not None and config != "ddp":
        argv.append(f"--trainer.strategy.init_args.param_sync_every={k}")
        if config == "local-adam":
            argv.append(f"--trainer.strategy.init_args.state_sync_every={k}")
    if ckpt_path:
        argv.append(f"--ckpt_path={ckpt_path}")
    return argv + list(extra)


@dataclass
class Metrics:
    #: (step, val_loss, train_s, fit_s), ``step`` counting the optimizer steps taken (Lightning's 0-based
    #: ``step`` column + 1); the clock columns are None without the TrainClock callback
    val: list[tuple[int, float, Optional[float], Optional[float]]] = field(default_factory=list)
    #: (step, train_loss)
    train: list[tuple[int, float]] = field(default_factory=list)
    #: :func:`common.bytes_sent_by_step` of the log: ``{Lightning step t (0-based): bytes sent in the first
    #: t + 1 optimizer steps}``, setup broadcast excluded (empty for DDP without a gradient size)
    sent: dict[int, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def bytes_at(self, step: int) -> Optional[float]:
        """Bytes one rank sent in its first ``step`` optimizer steps (``step`` counts steps, as in
        :attr:`val`): :func:`common.bytes_sent_by_step` at Lightning's 0-based ``step - 1``."""
        if step <= 0:
            return 0.0
        return self.sent.get(step - 1)


def read_metrics(run_dir: str | Path) -> Metrics:
    """``run_dir``: a logger directory (its ``version_0/metrics.csv``) or a ``metrics.csv``.

    ``val/loss`` is logged at the last training step and ``time/train_s`` right after at the same
    or the next step, so each clock row is paired with the validation row before it. Bytes sent:
    :func:`common.bytes_sent_by_step`."""
    out = Metrics()
    pending: Optional[tuple[int, float]] = None
    rows = read_rows(run_dir)
    out.sent = bytes_sent_by_step(rows)
    for row in rows:
        step = int(row["step"])
        for key, value in row.items():
            if value not in ("", None):
                try:
                    out.last[key] = float(value)
                except ValueError:
                    pass
        if row.get("train/loss"):
            out.train.append((step, float(row["train/loss"])))
        if row.get("val/loss"):
            if pending is not None:
                out.val.append((pending[0], pending[1], None, None))
            pending = (step + 1, float(row["val/loss"]))
        if row.get("time/train_s") and pending is not None:
            out.val.append((pending[0], pending[1], float(row["time/train_s"]), float(row["time/fit_s"])))
            pending = None
    if pending is not None:
        out.val.append((pending[0], pending[1], None, None))
    return out


def dump(obj: object, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))
