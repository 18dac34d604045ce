"""Workers doubled mid-run: the GPT example on 2 processes, a checkpoint, then resumed on 4.

For each scheme (DES-LOC with ``K_x = K``, Local Adam with every period ``K``):

1. ``examples/gpt/train.py fit`` on 2 processes (``--trainer.devices=2``, one machine, gloo over loopback)
   up to optimizer step ``--at``; the ``slowlink.StopAndCheckpoint`` callback saves a checkpoint there
   (``trainer.save_checkpoint``: DES-LOC's consensus main file plus one shard per rank) and stops;
2. the same command with ``--ckpt_path`` and ``--trainer.devices=4``: a different world size, so every
   rank starts from the consensus parameters and optimizer states (the strategy's consensus path);
   it trains to ``--steps`` (the same ``max_steps`` in both phases, so the cosine learning-rate schedule
   simply continues), with twice the global batch;
3. the baseline, in the same invocation: the same checkpoint resumed on 2 processes (the local path,
   nothing changes) to ``--steps``.

Stable means no loss spike at the switch beyond ``--tolerance`` (relative): the first validation loss
after the resume is at most ``(1 + tol)`` x the validation loss at the checkpoint, and the mean
training loss over the ``--window`` steps after the resume is at most ``(1 + tol)`` x the mean over the
``--window`` steps before it. The loss curves (validation, and rank 0's training loss) go to a PNG.

    python benchmarks/workers_doubled.py                    # a few minutes
    python benchmarks/workers_doubled.py --smoke            # tiny model, DES-LOC only, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, save_figure  # noqa: E402
from gptrun import (  # noqa: E402
    REPO, SMOKE_DATA_BYTES, SMOKE_MODEL, SMOKE_VAL_EVERY, Metrics, dump, ensure_data, gpt_argv, read_metrics)


def run(argv: list[str], log: Path, timeout: float) -> float:
    env = dict(os.environ)
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])})
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        print(f"--- {' '.join(argv)} exited {proc.returncode} ---\n{log.read_text()[-4000:]}", file=sys.stderr)
        raise SystemExit(1)
    return time.perf_counter() - start


def window_mean(train: list[tuple[int, float]], lo: int, hi: int) -> Optional[float]:
    vals = [loss for step, loss in train if lo < step <= hi]
    return statistics.fmean(vals) if vals else None


def plot(curves: dict[str, dict[str, Metrics]], at: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"before": "black", "4 processes": "tab:red", "2 processes": "tab:blue"}
    for ax, (scheme, phases) in zip(axes, curves.items()):
        for phase, m in phases.items():
            color = colors[phase]
            ax.plot([s for s, _ in m.train], [v for _, v in m.train], color=color, alpha=0.25, linewidth=0.8)
            ax.plot([s for s, *_ in m.val], [v for _, v, *_ in m.val], color=color, marker="o", markersize=3,
                    label={"before": "2 processes (before the checkpoint)",
                           "4 processes": "resumed on 4 processes (consensus path)",
                           "2 processes": "resumed on 2 processes (baseline)"}[phase])
        ax.axvline(at, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{scheme}: workers doubled at step {at}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (dots: validation; faint: rank 0 training)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and corpus, DES-LOC only, no baseline")
    ap.add_argument("--steps", type=int, default=300, help="max_steps of every phase")
    ap.add_argument("--at", type=int, default=150, help="checkpoint / switch step")
    ap.add_argument("--k", type=int, default=16, help="K_x for DES-LOC, K for Local Adam")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=30)
    ap.add_argument("--val-batches", default="1.0",
                    help="limit_val_batches; the default, the whole validation set, is the same data at any world size "
                         "(a count of batches per rank is not)")
    ap.add_argument("--window", type=int, default=25, help="training steps compared before and after the switch")
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative loss rise allowed at the switch")
    ap.add_argument("--out", default="runs/workers-doubled")
    ap.add_argument("--png", default="docs/slow-link-workers-doubled.png")
    ap.add_argument("--data-dir", default="data/gpt-stdlib")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    schemes = {"DES-LOC": "desloc", "Local Adam": "local-adam"}
    extra: list[str] = []
    tmp = None
    baseline = True
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="wd_smoke_")
        args.steps, args.at, args.k, args.val_every, args.batch_size, args.window = 8, 4, 2, 2, 2, 2
        args.out, args.png, args.data_dir, args.timeout = f"{tmp}/runs", f"{tmp}/wd.png", f"{tmp}/data", 180
        extra += SMOKE_MODEL
        schemes = {"DES-LOC": "desloc"}
        baseline = False
    extra += [f"--data.data_dir={args.data_dir}", f"--data.batch_size={args.batch_size}",
              f"--trainer.val_check_interval={args.val_every}", f"--trainer.limit_val_batches={args.val_batches}",
              f"--trainer.max_steps={args.steps}", "--trainer.log_every_n_steps=1",
              "--trainer.enable_progress_bar=false", "--seed_everything=1234"]
    try:
        if args.smoke:
            ensure_data(args.data_dir, SMOKE_DATA_BYTES, val_every=SMOKE_VAL_EVERY)
        else:
            ensure_data(args.data_dir, 4_000_000)
        out = Path(args.out)
        if not out.is_absolute():
            out = REPO / out
        rows, summary, curves = [], {}, {}
        commands: list[str] = []
        for scheme, config in schemes.items():
            ckpt = out / config / "ckpt" / f"step{args.at}.ckpt"
            shutil.rmtree(out / config, ignore_errors=True)
            ckpt.parent.mkdir(parents=True)
            phases: dict[str, Metrics] = {}
            # phase 1: 2 processes up to --at, checkpoint, stop. The callback has init args, so it goes in a
            # tiny config file of its own.
            cb = out / config / "stop_and_checkpoint.yaml"
            cb.write_text("trainer:\n  callbacks:\n    - class_path: lightning_desloc.callbacks.CommProgressBar\n"
                          f"    - class_path: slowlink.StopAndCheckpoint\n      init_args:\n        step: {args.at}\n"
                          f"        path: {ckpt}\n")
            argv = gpt_argv(config, save_dir=out / config, name="before", k=args.k,
                            extra=("--config", str(cb), "--trainer.devices=2", *extra))
            run(argv, out / config / "before.log", args.timeout)
            commands.append(" ".join(argv))
            phases["before"] = read_metrics(out / config / "before")
            resumes = {"4 processes": 4, **({"2 processes": 2} if baseline else {})}
            for phase, devices in resumes.items():
                name = f"resumed-{devices}"
                argv = gpt_argv(config, save_dir=out / config, name=name, k=args.k, ckpt_path=str(ckpt),
                                extra=(f"--trainer.devices={devices}", *extra))
                run(argv, out / config / f"{name}.log", args.timeout)
                commands.append(" ".join(argv))
                text = (out / config / f"{name}.log").read_text()
                path_used = "consensus" if ("CONSENSUS path" in text or "starts from the consensus" in text) else "local"
                phases[phase] = read_metrics(out / config / name)
                m, before = phases[phase], phases["before"]
                val_before = [v for v in before.val if v[0] <= args.at][-1][1]
                val_after = [v for v in m.val if v[0] > args.at][0]
                tr_before = window_mean(before.train, args.at - args.window, args.at)
                tr_after = window_mean(m.train, args.at, args.at + args.window)
                rise_val = val_after[1] / val_before - 1
                rise_tr = tr_after / tr_before - 1
                stable = rise_val <= args.tolerance and rise_tr <= args.tolerance
                final = m.val[-1]
                rows.append([scheme, f"{devices}" + (" (baseline)" if devices == 2 else ""), path_used,
                             f"{val_before:.4f}", f"{val_after[1]:.4f} (step {val_after[0]})", f"{rise_val:+.2%}",
                             f"{tr_before:.4f}", f"{tr_after:.4f}", f"{rise_tr:+.2%}",
                             f"{final[1]:.4f} (step {final[0]})", "yes" if stable else "NO"])
                summary[f"{scheme} / {devices}"] = {"val_before": val_before, "val_after": val_after[1],
                                                    "train_before": tr_before, "train_after": tr_after,
                                                    "final_val": final[1], "stable": stable, "path": path_used}
            curves[scheme] = phases
        print(f"GPT example, checkpoint at step {args.at} on 2 processes, resumed to step {args.steps}; "
              f"K = {args.k}; batch {args.batch_size} x 128 tokens per process and step; tolerance "
              f"{args.tolerance:.0%}; training-loss windows of {args.window} steps (rank 0)")
        print()
        print(markdown_table(["scheme", "processes after", "resume path", f"val loss at {args.at}",
                              "first val after", "val change", "train loss before", "train loss after",
                              "train change", "final val loss", "stable"], rows))
        print()
        for scheme in schemes:
            four = summary[f"{scheme} / 4"]
            line = (f"{scheme}: 4 processes / 2 processes before the switch (validation loss): "
                    f"{four['val_after'] / four['val_before']:.3f}")
            if baseline:
                two = summary[f"{scheme} / 2"]
                line += (f"; final validation loss, 4 processes / 2 processes (baseline, same run): "
                         f"{four['final_val'] / two['final_val']:.3f}")
            print(line)
        png = Path(args.png)
        if not png.is_absolute():
            png = REPO / png
        plot(curves, args.at, png)
        dump({"summary": summary, "commands": commands}, out / "summary.json")
        print(f"\nlogs: {args.out}/<scheme>/<phase>/version_0/metrics.csv; plot: {args.png}")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
