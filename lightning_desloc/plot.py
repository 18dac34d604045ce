"""Plot validation loss against steps and against bytes communicated, one line per run.

    python -m lightning_desloc.plot runs/gpt-tiny/desloc runs/gpt-tiny/local-adam runs/gpt-tiny/ddp \\
        --out runs/gpt-tiny/plots

Each run is a ``metrics.csv`` written by Lightning's ``CSVLogger``, or a directory holding one (a
logger's ``name`` directory: its newest ``version_*`` is used). Writes ``val_loss_vs_step.png`` and
``val_loss_vs_bytes.png`` into ``--out`` and prints one summary line per run.

Bytes communicated at a validation row of step ``t``:

* DES-LOC / Local Adam runs (``comm/...`` columns, logged by ``DeslocStrategy`` at each sync round):
  ``comm/bytes_total - comm/bytes/setup`` of the last ledger row at or before ``t`` (the setup broadcast
  is left out because DDP pays it too);
* runs without a ledger (DDP): ``model/grad_bytes_per_step * (t + 1)``, the gradient bytes DDP
  all-reduces per step times the steps taken (Lightning's ``step`` column counts from 0). The GPT
  example logs ``model/grad_bytes_per_step``; ``--grad-bytes`` supplies it for logs that lack it.

Labels come from ``--labels`` or, when absent, from the run's ``config.yaml`` (LightningCLI saves one
next to ``metrics.csv``): "DDP", "Local Adam (K=...)" or "DES-LOC (K_x=...)"; failing that, the run's
directory name.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

VAL_LOSS_KEYS = ("val/loss", "val_loss", "val/loss_epoch")
GRAD_BYTES_KEY = "model/grad_bytes_per_step"


@dataclass
class Run:
    """One run's validation curve and communication, read from a CSVLogger ``metrics.csv``."""

    label: str
    path: Path
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    bytes_sent: list[float] = field(default_factory=list)
    has_ledger: bool = False

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.nan


def find_metrics_csv(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/metrics.csv``, else the newest ``path/version_*/metrics.csv``."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "metrics.csv").is_file():
        return p / "metrics.csv"
    versions = [d for d in p.glob("version_*") if (d / "metrics.csv").is_file()]
    if not versions:
        raise FileNotFoundError(f"no metrics.csv in {p} or its version_* directories")

    def version_number(d: Path) -> tuple[int, str]:
        suffix = d.name[len("version_") :]
        return (int(suffix), d.name) if suffix.isdigit() else (-1, d.name)

    return max(versions, key=version_number) / "metrics.csv"


def _float(value: Optional[str]) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return None


def label_from_config(config_path: Path) -> Optional[str]:
    """"DDP", "Local Adam (K=..)" or "DES-LOC (K_x=..)" from a LightningCLI ``config.yaml``; ``None`` if unknown."""
    if not config_path.is_file():
        return None
    try:
        import yaml

        config = yaml.safe_load(config_path.read_text())
        strategy = config["trainer"]["strategy"]
    except Exception:
        return None
    if isinstance(strategy, str):
        if strategy.startswith("desloc"):
            return "DES-LOC (K_x=256)"
        return strategy.upper() if strategy.startswith("ddp") else strategy
    if not isinstance(strategy, dict):
        return None
    class_path = str(strategy.get("class_path", ""))
    args = strategy.get("init_args") or {}
    if class_path.endswith("DeslocStrategy"):
        k = args.get("param_sync_every", 256)
        state = args.get("state_sync_every")
        policy = args.get("state_policy", "average")
        if policy != "average":
            return f"{policy} (K_x={k})"
        if state is not None and state == k:
            return f"Local Adam (K={k})"
        return f"DES-LOC (K_x={k})"
    if class_path.endswith("DDPStrategy"):
        return "DDP"
    return class_path.rsplit(".", 1)[-1] or None


def read_run(path: str | os.PathLike, label: Optional[str] = None, grad_bytes: Optional[float] = None) -> Run:
    """Read one run: validation losses by step, and the bytes communicated by each of those steps."""
    csv_path = find_metrics_csv(path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if label is None:
        label = label_from_config(csv_path.parent / "config.yaml")
        if label is None:
            name = csv_path.parent.name
            label = csv_path.parent.parent.name if name.startswith("version_") else name
    run = Run(label=label, path=csv_path)

    ledger: list[tuple[int, float]] = []  # (step, bytes sent so far, setup excluded)
    val: dict[int, float] = {}
    for row in rows:
        step = _float(row.get("step"))
        if step is None:
            continue
        total = _float(row.get("comm/bytes_total"))
        if total is not None:
            ledger.append((int(step), total - (_float(row.get("comm/bytes/setup")) or 0.0)))
        if grad_bytes is None and _float(row.get(GRAD_BYTES_KEY)) is not None:
            grad_bytes = _float(row.get(GRAD_BYTES_KEY))
        for key in VAL_LOSS_KEYS:
            loss = _float(row.get(key))
            if loss is not None:
                val[int(step)] = loss  # the last value logged at a step wins
                break
    if not val:
        raise ValueError(f"{csv_path} has no validation loss column ({', '.join(VAL_LOSS_KEYS)}) with values")
    run.has_ledger = bool(ledger)
    ledger.sort()
    for step in sorted(val):
        run.steps.append(step)
        run.val_loss.append(val[step])
        if run.has_ledger:
            before = [b for s, b in ledger if s <= step]
            run.bytes_sent.append(max(before) if before else 0.0)
        elif grad_bytes is not None:
            run.bytes_sent.append(grad_bytes * (step + 1))
        else:
            run.bytes_sent.append(math.nan)
    return run


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def plot_runs(runs: Sequence[Run], out_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """Write ``val_loss_vs_step.png`` and (if any run has byte counts) ``val_loss_vs_bytes.png``."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run in runs:
        ax.plot([s + 1 for s in run.steps], run.val_loss, marker="o", markersize=3, label=run.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "Validation loss vs step")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "val_loss_vs_step.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    with_bytes = [r for r in runs if any(b > 0 for b in r.bytes_sent if not math.isnan(b))]
    if with_bytes:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for run in with_bytes:
            pts = [(b, loss) for b, loss in zip(run.bytes_sent, run.val_loss) if b > 0 and not math.isnan(b)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=run.label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _human_bytes(x)))
        ax.set_xlabel("bytes communicated per rank (log scale; setup broadcast excluded)")
        ax.set_ylabel("validation loss")
        ax.set_title(title or "Validation loss vs bytes communicated")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "val_loss_vs_bytes.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def summary(runs: Sequence[Run]) -> str:
    lines = [f"{'run':<22} {'last step':>9} {'val loss':>9} {'bytes sent':>12}"]
    for r in runs:
        sent = r.bytes_sent[-1] if r.bytes_sent else math.nan
        lines.append(
            f"{r.label:<22} {r.steps[-1] + 1:>9} {r.final_val_loss:>9.4f} "
            f"{_human_bytes(sent) if not math.isnan(sent) else 'n/a':>12}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_desloc.plot",
        description="Plot validation loss vs step and vs bytes communicated from CSVLogger metrics.csv files.",
    )
    parser.add_argument("runs", nargs="+", help="metrics.csv files, or CSVLogger directories holding them")
    parser.add_argument("--out", default="runs/plots", help="directory for the PNGs (default: runs/plots)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: from config.yaml)")
    parser.add_argument(
        "--grad-bytes",
        type=float,
        default=None,
        help=f"gradient bytes per step for runs without a ledger that did not log {GRAD_BYTES_KEY}",
    )
    parser.add_argument("--title", default="", help="title for both plots")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels needs one label per run ({len(args.runs)}), got {len(args.labels)}")
    labels = args.labels or [None] * len(args.runs)
    runs = [read_run(path, label, args.grad_bytes) for path, label in zip(args.runs, labels)]
    written = plot_runs(runs, args.out, args.title)
    print(summary(runs))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
