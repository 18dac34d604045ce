"""Plot validation loss against steps and against bytes communicated, one line per run.

    python -m lightning_desloc.plot runs/gpt-tiny/desloc runs/gpt-tiny/local-adam runs/gpt-tiny/ddp \\
        --out runs/gpt-tiny/plots

Each run is a ``metrics.csv`` written by Lightning's ``CSVLogger``, or a directory holding one (a
logger's ``name`` directory: its newest ``version_*`` is used). Writes ``val_loss_vs_step.png`` and
``val_loss_vs_bytes.png`` into ``--out`` and prints one summary line per run.

Bytes communicated at a validation row of step ``t`` are :func:`bytes_sent_by_step` at ``t`` (the one
definition of "bytes sent by step t", which the benchmarks in ``benchmarks/`` import from here):

* DES-LOC / Local Adam runs (``comm/...`` columns, logged by ``DeslocStrategy`` at each sync round):
  ``comm/bytes_total - comm/bytes/setup`` of the last ledger row at or before ``t``, carried forward
  between rounds (the setup broadcast is left out because DDP pays it too);
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

VAL_LOSS_KEYS = ("val/loss", "val_loss", "val/loss_epoch")
GRAD_BYTES_KEY = "model/grad_bytes_per_step"
LEDGER_TOTAL_KEY = "comm/bytes_total"
SETUP_BYTES_KEY = "comm/bytes/setup"


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


def bytes_sent_by_step(rows: Iterable[Mapping[str, Any]], grad_bytes: Optional[float] = None) -> dict[int, float]:
    """Bytes one rank has sent by each step of a run, from the rows of its CSVLogger ``metrics.csv``.

    The one definition of "bytes sent by step ``t``" in this repository (``lightning_desloc.plot`` and
    every script in ``benchmarks/`` use it). ``rows`` are ``csv.DictReader`` rows (values are strings,
    ``""`` for an empty cell; numbers are accepted too).

    ``t`` is the value of the ``step`` column: Lightning's 0-based optimizer-step index. The ledger rows
    and the ``val/loss`` rows of the ``t + 1``-th optimizer step are both logged at ``step = t`` (the
    strategy logs at ``trainer.global_step`` from inside the optimizer step, before Lightning counts
    it), so the value at ``t`` is what was sent in the first ``t + 1`` optimizer steps. Units: payload
    bytes per rank (``numel * element_size`` of what is handed to a collective, the ledger's convention;
    rank 0's ledger, as the CSVLogger writes rank 0's metrics).

    * Runs with a ledger (a ``comm/bytes_total`` column with values): ``comm/bytes_total -
      comm/bytes/setup`` of the last ledger row logged at a step ``<= t``, i.e. the ledger's
      ``compared_bytes`` (every category except ``setup``, rank 0's weights broadcast, which DDP pays
      too). The ledger is logged after each averaging round only, so between rounds the last logged
      value holds (a step function carried forward, never interpolated); it is ``0.0`` before the first
      ledger row. Bytes recorded since the last round (e.g. a consensus validation's ``eval``) count
      from the next logged row on. ``comm/bytes_ddp_equivalent`` is what DDP would have sent, not
      bytes sent, and is not used.
    * Runs without a ledger (DDP): ``grad_bytes * (t + 1)``, one gradient all-reduced per optimizer
      step; ``grad_bytes`` is the argument or else the ``model/grad_bytes_per_step`` column.

    Returns ``{t: bytes}`` for every ``t`` from 0 to the largest ``step`` in ``rows``, whether or not a
    row was logged at ``t``; ``{}`` when no row has a step, or there is neither a ledger nor a gradient
    size.
    """
    ledger: list[tuple[int, float]] = []  # (step, compared bytes) of each ledger row, in file order
    last_step: Optional[int] = None
    for row in rows:
        step = _float(row.get("step"))
        if step is None:
            continue
        step = int(step)
        last_step = step if last_step is None else max(last_step, step)
        total = _float(row.get(LEDGER_TOTAL_KEY))
        if total is not None:
            ledger.append((step, total - (_float(row.get(SETUP_BYTES_KEY)) or 0.0)))
        if grad_bytes is None:
            grad_bytes = _float(row.get(GRAD_BYTES_KEY))
    if last_step is None:
        return {}
    if not ledger:
        if grad_bytes is None:
            return {}
        return {t: grad_bytes * (t + 1) for t in range(last_step + 1)}
    ledger.sort(key=lambda sb: sb[0])  # stable: of the rows at one step, the last one logged wins
    out: dict[int, float] = {}
    sent, i = 0.0, 0
    for t in range(last_step + 1):
        while i < len(ledger) and ledger[i][0] <= t:
            sent = ledger[i][1]
            i += 1
        out[t] = sent
    return out


def has_ledger(rows: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any row carries the strategy's ledger (a ``comm/bytes_total`` value)."""
    return any(_float(row.get(LEDGER_TOTAL_KEY)) is not None for row in rows)


def read_run(path: str | os.PathLike, label: Optional[str] = None, grad_bytes: Optional[float] = None) -> Run:
    """Read one run: validation losses by step, and the bytes communicated by each of those steps
    (:func:`bytes_sent_by_step`)."""
    csv_path = find_metrics_csv(path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if label is None:
        label = label_from_config(csv_path.parent / "config.yaml")
        if label is None:
            name = csv_path.parent.name
            label = csv_path.parent.parent.name if name.startswith("version_") else name
    run = Run(label=label, path=csv_path)

    val: dict[int, float] = {}
    for row in rows:
        step = _float(row.get("step"))
        if step is None:
            continue
        for key in VAL_LOSS_KEYS:
            loss = _float(row.get(key))
            if loss is not None:
                val[int(step)] = loss  # the last value logged at a step wins
                break
    if not val:
        raise ValueError(f"{csv_path} has no validation loss column ({', '.join(VAL_LOSS_KEYS)}) with values")
    run.has_ledger = has_ledger(rows)
    sent = bytes_sent_by_step(rows, grad_bytes)
    for step in sorted(val):
        run.steps.append(step)
        run.val_loss.append(val[step])
        run.bytes_sent.append(sent.get(step, math.nan))
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
