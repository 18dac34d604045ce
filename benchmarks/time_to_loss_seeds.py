"""Several ``time_to_loss.py`` invocations (one per seed) side by side.

    sudo python benchmarks/time_to_loss.py --seed 1234 --out runs/slow-link/ttl-s1234   # one per seed
    sudo python benchmarks/time_to_loss.py --seed 2 --out runs/slow-link/ttl-s2
    python benchmarks/time_to_loss_seeds.py runs/slow-link/ttl-s1234 runs/slow-link/ttl-s2

Each invocation measured its runs against its own DDP run on the same link, so every ratio below comes
from one invocation; this script only lines them up and averages them. A run that did not reach its
DDP's loss has no time-to-target ratio ("-"); where Local Adam did not reach it and DES-LOC did, the
ratio against Local Adam is a lower bound ("> 2.08x": Local Adam's whole run over DES-LOC's time) and
is left out of the mean; the "per step" columns (DDP's, or Local Adam's at the same
K, ms per step over the run's) exist for every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402
from gptrun import read_metrics  # noqa: E402
from time_to_loss import draw, run_dir_name  # noqa: E402


def fmt(values: list[float | None], unit: str = "x") -> str:
    return " / ".join("-" if v is None else f"{v:.2f}{unit}" for v in values)


def mean_of(values: list[float | None]) -> str:
    hit = [v for v in values if v is not None]
    return f"{statistics.mean(hit):.2f}x" if hit else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="--out directories of time_to_loss.py (each with summary.json)")
    ap.add_argument("--png", help="also draw each invocation's validation loss against wall clock, side by side")
    args = ap.parse_args(argv)
    summaries = [json.loads((Path(d) / "summary.json").read_text()) for d in args.runs]
    labels: list[str] = []
    for s in summaries:
        labels += [label for label in s["runs"] if label not in labels]
    rows = []
    for label in labels:
        per = [s["runs"].get(label) for s in summaries]
        ddp_ms = [s["runs"]["DDP"]["ms_per_step"] for s in summaries]
        vs_ddp = [r["speedup_vs_ddp"] if r and r.get("reached") else None for r in per]
        vs_la = [r.get("speedup_vs_local_adam") if r and r.get("reached") else None for r in per]
        la_bounds = [r.get("speedup_vs_local_adam_at_least") if r and r.get("reached") else None for r in per]
        vs_la_cells = " / ".join(f"{v:.2f}x" if v is not None else (f"> {b:.2f}x" if b else "-")
                                 for v, b in zip(vs_la, la_bounds))
        per_step = [d / r["ms_per_step"] if r else None for d, r in zip(ddp_ms, per)]
        k = label.split("=")[1].rstrip(")") if label.startswith("DES-LOC (K_x=") else None
        la = [s["runs"].get(f"Local Adam (K={k})") for s in summaries] if k else []
        per_step_la = [a["ms_per_step"] / r["ms_per_step"] if a and r else None for a, r in zip(la, per)]
        mb = [r["bytes_to_target"] / 1e6 if r and r.get("reached") and r.get("bytes_to_target") else None
              for r in per]
        reached = sum(1 for r in per if r and r.get("reached"))
        rows.append([
            label, f"{reached}/{sum(1 for r in per if r)}", fmt(vs_ddp), mean_of(vs_ddp),
            vs_la_cells if any(vs_la) or any(la_bounds) else "-", mean_of(vs_la), fmt(per_step), fmt(mb, ""),
            fmt(per_step_la) if any(per_step_la) else "-",
        ])
    targets = " / ".join(f"{s['target']:.4f}" for s in summaries)
    print(f"{len(summaries)} invocations ({', '.join(args.runs)}); DDP targets {targets}")
    print(markdown_table(["run", "reached", "speed-up vs DDP (per seed)", "mean (reached)",
                          "vs Local Adam, same K (per seed)", "mean (reached)", "per step vs DDP",
                          "MB to target (per seed)", "per step vs Local Adam, same K"], rows))
    if args.png:
        plot(args.runs, summaries, Path(args.png))
        print(f"plot: {args.png}")
    return 0


def plot(dirs: list[str], summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dirs), figsize=(5.2 * len(dirs), 4.2), sharey=True, squeeze=False)
    for ax, d, s in zip(axes[0], dirs, summaries):
        results = {label: read_metrics(Path(d) / run_dir_name(label)) for label in s["runs"]}
        draw(ax, results, s["target"], Path(d).name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
