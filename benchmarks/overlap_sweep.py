"""Step time against K_x: blocking and overlapped rounds beside the max(compute, link) limit (issue 13).

    python benchmarks/overlap_sweep.py                       # K_x 8 16 32 64, tau = K_x - 1, modelled link
    python benchmarks/overlap_sweep.py --k 8 16 32 --png docs/slow-link-overlap-vs-k.png
    python benchmarks/overlap_sweep.py --smoke               # K_x 2 and 4 on the smoke model
    python benchmarks/overlap_sweep.py --from-json runs/overlap-sweep.json --png out.png   # redraw, run nothing

One ``benchmarks/overlap.py --k K --json ...`` invocation per K_x (its three runs: no communication,
blocking, overlapped with ``tau = K_x - 1``; the same model, link and options, ``--mbit``,
``--latency-ms`` and ``--link`` passed through), so each K's ratios come from runs made one after the
other in one invocation. Printed: one row per K_x with the mean ms per step of the three runs, the
link's time per step (what the rounds would cost if they were only serialised bytes and latency,
``overlap.py``'s model: parameters every K_x, ``exp_avg`` every 3 K_x, ``exp_avg_sq`` every 6 K_x),
the limit ``max(compute, link)`` that perfect overlap would reach, and the ratios of the blocking and
overlapped steps to that limit. ``--png`` draws the same: step time against K_x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, save_figure, write_json  # noqa: E402

OVERLAP = Path(__file__).resolve().parent / "overlap.py"


def run_k(k: int, passthrough: list[str], tmp: str) -> dict:
    """``overlap.py`` at K_x = ``k`` (tau = k - 1); its JSON."""
    out = Path(tmp) / f"k{k}.json"
    cmd = [sys.executable, str(OVERLAP), "--k", str(k), "--tau", str(k - 1), "--json", str(out), *passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"overlap.py --k {k} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(proc.stdout.strip().splitlines()[0], flush=True)  # the model and link line
    return json.loads(out.read_text())


def row_of(k: int, data: dict) -> dict:
    res = data["results"]
    compute = res["no communication"]["mean_ms"]
    return {"k": k, "compute_ms": compute, "blocking_ms": res["blocking"]["mean_ms"],
            "overlapped_ms": res["overlapped"]["mean_ms"], "link_ms": data["link_per_step_ms"],
            "limit_ms": data["limit_ms"]}


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(ks, [r["blocking_ms"] for r in rows], "o-", label="blocking")
    ax.plot(ks, [r["overlapped_ms"] for r in rows], "s-", label="overlapped (tau = K_x - 1)")
    ax.plot(ks, [r["compute_ms"] for r in rows], "^:", color="grey", label="no communication (measured)")
    ax.plot(ks, [r["limit_ms"] for r in rows], "k--", label="limit: max(compute, link time per step)")
    ax.plot(ks, [r["link_ms"] for r in rows], ":", color="C3", label="link time per step (model)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K_x (optimizer steps between parameter averages)")
    ax.set_ylabel("mean step time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=None, help="K_x values (default 8 16 32 64; smoke 2 4)")
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--latency-ms", type=float, default=25.0)
    ap.add_argument("--link", choices=("model", "real"), default="model")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="overlap.py's smoke model, K_x 2 and 4")
    ap.add_argument("--from-json", metavar="JSON", help="run nothing: the table and plot from a --json of an earlier run")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key in ("mbit", "latency_ms", "link"):
            setattr(args, key, saved["args"][key])
        return report(args, saved["rows"])
    ks = args.k or ([2, 4] if args.smoke else [8, 16, 32, 64])
    if any(k < 2 for k in ks):
        ap.error(f"--k needs K_x >= 2 (tau = K_x - 1 >= 1), got {ks}")
    passthrough = ["--mbit", f"{args.mbit:g}", "--latency-ms", f"{args.latency_ms:g}", "--link", args.link]
    if args.smoke:
        passthrough.append("--smoke")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row_of(k, run_k(k, passthrough, tmp)) for k in ks]
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows})
    return report(args, rows)


def report(args, rows: list[dict]) -> int:
    """Print the table of ``rows`` (and draw ``--png``)."""
    table = [[r["k"], r["k"] - 1, f"{r['compute_ms']:.1f}", f"{r['blocking_ms']:.1f}", f"{r['overlapped_ms']:.1f}",
              f"{r['link_ms']:.1f}", f"{r['limit_ms']:.1f}", f"{r['blocking_ms'] / r['limit_ms']:.2f}x",
              f"{r['overlapped_ms'] / r['limit_ms']:.2f}x", f"{r['blocking_ms'] / r['overlapped_ms']:.2f}x"]
             for r in rows]
    print(markdown_table(["K_x", "tau", "compute ms/step", "blocking ms/step", "overlapped ms/step",
                          "link ms/step (model)", "limit ms/step", "blocking vs limit", "overlapped vs limit",
                          "blocking / overlapped"], table))
    if args.png:
        link = "modelled link" if args.link == "model" else "delay line"
        plot(rows, f"2 ranks, {link} {args.mbit:g} Mbit/s, {args.latency_ms:g} ms one way", Path(args.png))
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
