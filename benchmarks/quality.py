"""Quality on an ordinary link: the GPT example under every scheme, same data and steps, several seeds.

    python benchmarks/quality.py                       # the schemes below, seeds 1 and 2, 300 steps, K_x = 16
    python benchmarks/quality.py --mode sensitivity    # DES-LOC with K_x in {8, 16, 32, 64}; K_v in {16, 96, 288}
    python benchmarks/quality.py --mode hierarchical   # 4 processes: flat DES-LOC vs 2 groups of 2 (issue 7.3)
    python benchmarks/quality.py --smoke               # a 1-layer GPT on a small corpus, a few steps

Every run is ``python examples/gpt/train.py fit --config configs/gpt-tiny-*.yaml`` plus command-line
overrides (2 CPU processes, gloo), one subprocess per run, logged with the configs' CSVLogger under
``--out-dir``. A run whose ``result.json`` exists is not run again (delete ``--out-dir`` to start over).
The final validation loss is the ``val/loss`` of the last validation (at ``max_steps``, consensus model
for the DES-LOC family, averaged over ranks). Bytes are rank 0's ledger at the end of training
(``comm/bytes/...`` in ``metrics.csv``): "sync" counts the schedule's averages (parameters, buffers,
states), "all" adds the consensus validations (``eval``) and control/metrics collectives but not the
setup broadcast, which DDP pays as well. DDP's bytes are one gradient (``model/grad_bytes_per_step``)
per step. Ratios are against DDP's bytes in the same table.

Schemes (``--schemes`` picks some): DDP, Local Adam (K = K_x for everything), keep-local, reset,
DES-LOC (K_u = 3 K_x, K_v = 6 K_x), and DES-LOC with: bf16 averaging, bf16 parameters + int8 states,
int8 everywhere, the outer Nesterov step (``outer_lr=0.7, outer_momentum=0.9``), and
``param_sync_every="auto"``. Rounds overlapped with compute and streamed in fragments (issue 13) are
named by their options: ``"DES-LOC tau=3"`` (``overlap_steps=3``), ``"DES-LOC F=4"`` (``fragments=4``),
``"DES-LOC F=4 tau=1"`` (both), ``"DES-LOC tau=7 lam=0.25"`` (``overlap_local_weight=0.25``):

    python benchmarks/quality.py --k 8 --steps 600 --schemes DES-LOC "DES-LOC tau=1" "DES-LOC F=4 tau=1"

``--mode hierarchical`` runs 4 processes (``--devices``): DDP, flat DES-LOC, and DES-LOC across 2 groups
of 2 (``group_size=2``) with the gradients all-reduced inside each group every step, or with DES-LOC
inside the groups too (``group_param_sync_every=4``). "sync bytes" is then the level across groups
(what would cross the slow link between nodes); "inner bytes" the level inside the groups
(``comm/group/bytes/...``, the node-local link).

``--lock FILE`` (or ``$DESLOC_BENCH_LOCK``) holds an exclusive ``flock`` on FILE during each run, so
that runs of other benchmarks on a shared machine do not overlap with it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, bytes_sent_by_step, markdown_table, read_rows, write_json  # noqa: E402

TRAIN = REPO / "examples" / "gpt" / "train.py"
CONFIG = {"ddp": "configs/gpt-tiny-ddp.yaml", "local-adam": "configs/gpt-tiny-local-adam.yaml",
          "desloc": "configs/gpt-tiny-desloc.yaml"}
S = "--trainer.strategy.init_args."


def scheme_args(name: str, k: int) -> tuple[str, list[str]]:
    """(config, overrides) of one scheme at K_x = ``k``."""
    if name == "DDP":
        return "ddp", []
    if name == "Local Adam":
        return "local-adam", [f"{S}param_sync_every={k}", f"{S}state_sync_every={k}"]
    base = [f"{S}param_sync_every={k}"]
    extra = {
        "DES-LOC": [],
        "keep-local": [f"{S}state_policy=keep_local"],
        "reset": [f"{S}state_policy=reset"],
        "DES-LOC bf16": [f"{S}compression=bf16"],
        "DES-LOC bf16 params, int8 states": [f'{S}compression={{"params": "bf16", "states": "int8"}}'],
        "DES-LOC int8": [f"{S}compression=int8"],
        "DES-LOC + outer Nesterov": [f"{S}outer_lr=0.7", f"{S}outer_momentum=0.9"],
    }
    if name == "DES-LOC groups of 2":
        return "desloc", base + [f"{S}group_size=2"]
    if name == "DES-LOC groups of 2, inner K=4":
        return "desloc", base + [f"{S}group_size=2", f"{S}group_param_sync_every=4"]
    if name == "DES-LOC auto":
        return "desloc", [f"{S}param_sync_every=auto"]
    if name.startswith("DES-LOC K_v="):  # sensitivity: K_u = 3 K_x, K_v as named
        k_v = int(name.split("=")[1])
        return "desloc", base + [f'{S}state_sync_every={{"exp_avg": {3 * k}, "exp_avg_sq": {k_v}}}']
    if name.startswith(("DES-LOC tau=", "DES-LOC F=")):  # "DES-LOC F=4 tau=1 lam=0.25": fragments, overlap
        keys = {"tau": "overlap_steps", "F": "fragments", "lam": "overlap_local_weight"}
        return "desloc", base + [f"{S}{keys[key]}={float(v) if key == 'lam' else int(v)}"
                                 for key, v in (w.split("=") for w in name.split()[1:])]
    return "desloc", base + extra[name]


QUALITY_SCHEMES = ("DDP", "Local Adam", "keep-local", "reset", "DES-LOC", "DES-LOC bf16",
                   "DES-LOC bf16 params, int8 states", "DES-LOC int8", "DES-LOC + outer Nesterov", "DES-LOC auto")
HIERARCHICAL_SCHEMES = ("DDP", "DES-LOC", "DES-LOC groups of 2", "DES-LOC groups of 2, inner K=4")
SENS_K_X = (8, 16, 32, 64)
SENS_K_V = (16, 96, 288)


@contextmanager
def locked(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_result(run_dir: Path) -> dict:
    """Final val loss and ledger bytes from ``run_dir/version_0/metrics.csv``.

    Everything is read at the step of the last validation (the end of training: ``--steps`` is a
    multiple of ``--val-every``). ``all_bytes`` is :func:`common.bytes_sent_by_step` there (setup
    broadcast excluded; for DDP one gradient per step taken); the per-category split
    (``bytes_by_category``, ``sync_bytes``, ``inner_bytes``) is the last value of each column logged
    at or before it."""
    rows = read_rows(run_dir)
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    sent = bytes_sent_by_step(rows)
    final_step = val[-1][0] if val else max(sent, default=None)
    last: dict[str, float] = {}
    for r in rows:  # latest value of every comm/ and model/ column up to the final step
        if final_step is not None and r.get("step") and int(r["step"]) > final_step:
            continue
        for k, v in r.items():
            if v and (k.startswith("comm/") or k.startswith("model/")):
                last[k] = float(v)
    grad = last.get("model/grad_bytes_per_step")
    cats = {k[len("comm/bytes/"):]: v for k, v in last.items() if k.startswith("comm/bytes/")}
    inner = sum(v for k, v in last.items() if k.startswith("comm/group/bytes/"))
    out = {"val": val, "final_val_loss": val[-1][1] if val else math.nan, "grad_bytes_per_step": grad,
           "bytes_by_category": cats, "inner_bytes": inner, "auto": {k: v for k, v in last.items() if k.startswith("comm/auto/")}}
    out["all_bytes"] = sent.get(final_step, math.nan) if final_step is not None else math.nan
    if cats:
        out["sync_bytes"] = sum(v for k, v in cats.items() if k.startswith(("params", "buffers", "state/")))
    else:  # DDP: every byte is a gradient all-reduce
        out["sync_bytes"] = out["all_bytes"]
    return out


def run_one(name: str, k: int, seed: int, args, out_dir: Path) -> dict:
    tag = f"{name.replace(' ', '_').replace(',', '').replace('=', '')}-k{k}-s{seed}"
    if args.devices != 2:
        tag += f"-d{args.devices}"
    run_dir = out_dir / tag
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    config, overrides = scheme_args(name, k)
    argv = [sys.executable, str(TRAIN), "fit", "--config", str(REPO / CONFIG[config]),
            f"--seed_everything={seed}", f"--trainer.max_steps={args.steps}",
            f"--trainer.val_check_interval={args.val_every}", f"--trainer.limit_val_batches={args.val_batches}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={out_dir}", f"--trainer.logger.init_args.name={tag}",
            "--trainer.logger.init_args.version=0", f"--data.data_dir={args.data_dir}",
            f"--data.max_bytes={args.max_bytes}", f"--trainer.devices={args.devices}", *args.model_overrides,
            *overrides]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with locked(args.lock):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - t0
    res = None
    if (run_dir / "version_0" / "metrics.csv").exists():
        res = read_result(run_dir)
    # A worker that aborts at interpreter exit, after training and the last validation were logged
    # ("terminate called without an active exception", seen now and then on this machine), does not
    # change the numbers: accept the run when every validation reached the log, and say so.
    complete = res is not None and len(res["val"]) >= args.steps // args.val_every
    if proc.returncode != 0 and not complete:
        raise RuntimeError(f"{name} seed {seed} failed ({proc.returncode}):\n{' '.join(argv)}\n{proc.stdout[-5000:]}")
    if proc.returncode != 0:
        print(f"[quality] {name} seed {seed}: exit code {proc.returncode} after training completed "
              f"({proc.stdout.strip().splitlines()[-1]!r}); results kept", flush=True)
    res |= {"scheme": name, "k": k, "seed": seed, "seconds": seconds, "command": argv[1:],
            "exit_code": proc.returncode}
    res["log_auto"] = [ln for ln in proc.stdout.splitlines() if "auto" in ln.lower() and "K_x" in ln][-3:]
    write_json(done, res)
    return res


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("quality", "sensitivity", "hierarchical"), default="quality")
    parser.add_argument("--devices", type=int, default=None, help="processes per run (default 2; 4 in hierarchical mode)")
    parser.add_argument("--schemes", nargs="+", help="subset of the schemes (quality mode)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--k", type=int, default=16, help="K_x (and Local Adam's K)")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-batches", type=int, default=32)
    parser.add_argument("--data-dir", default="data/gpt-stdlib")
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--out-dir", default="runs/quality")
    parser.add_argument("--plot", help="write a PNG here")
    parser.add_argument("--lock", default=os.environ.get("DESLOC_BENCH_LOCK"))
    parser.add_argument("--smoke", action="store_true", help="1-layer width-32 GPT, 300 kB corpus, 8 steps, K_x 2")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tail", type=int, default=1, metavar="N",
                        help="score a run by the mean of its last N validations (default 1: the final one); "
                             "steadier where one validation wanders (small batches)")
    parser.add_argument("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"),
                        help="AdamW betas of the GPT (default: the config's 0.9 0.95); use a fresh --out-dir")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more train.py overrides for every run, e.g. model.n_embd=128 data.batch_size=4 "
                             "(passed as --KEY=VALUE); use a fresh --out-dir")
    args = parser.parse_args(argv)
    if args.devices is None:
        args.devices = 4 if args.mode == "hierarchical" else 2
    if args.tail < 1:
        parser.error(f"--tail counts validations, at least 1; got {args.tail}")
    if args.mode == "hierarchical" and args.devices % 2:
        parser.error(f"--mode hierarchical needs an even --devices (groups of 2), got {args.devices}")
    bad = [kv for kv in args.set if "=" not in kv or kv.startswith("-")]
    if bad:
        parser.error(f"--set takes KEY=VALUE without leading dashes (model.n_embd=128), got {bad}")
    args.model_overrides = [f"--model.betas=[{args.betas[0]},{args.betas[1]}]"] if args.betas else []
    args.model_overrides += [f"--{kv}" for kv in args.set]
    if args.smoke:
        args.steps, args.k, args.val_every, args.val_batches = 8, 2, 8, 2
        args.max_bytes = 300_000
        args.model_overrides += ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32",
                                "--model.warmup_steps=2", "--data.val_every=4", "--data.batch_size=4"]
    out_dir = Path(args.out_dir)
    if not out_dir.is_absolute():
        out_dir = REPO / out_dir
    if args.smoke and args.data_dir == parser.get_default("data_dir"):
        args.data_dir = str(out_dir / "data")  # a small corpus of its own

    if args.mode == "quality":
        runs = [(s, args.k) for s in (args.schemes or (QUALITY_SCHEMES[:3] + ("DES-LOC",) if args.smoke
                                                         else QUALITY_SCHEMES))]
    elif args.mode == "hierarchical":
        runs = [(s, args.k) for s in (args.schemes or HIERARCHICAL_SCHEMES)]
    else:
        runs = [("DES-LOC", k) for k in SENS_K_X] + [(f"DES-LOC K_v={kv}", args.k) for kv in SENS_K_V]
        if not args.smoke:
            runs.append(("DES-LOC auto", args.k))
    results: dict[tuple[str, int], list[dict]] = {}
    for seed in args.seeds:  # seed-major: a partial sweep already has every scheme once
        for name, k in runs:
            r = run_one(name, k, seed, args, out_dir)
            results.setdefault((name, k), []).append(r)
            print(f"[quality] {name} K_x={k} seed {seed}: val loss {r['final_val_loss']:.4f}, "
                  f"{fmt_bytes(r['sync_bytes'])} sync, {r['seconds']:.0f} s", flush=True)

    ddp = [r for (n, _), rs in results.items() if n == "DDP" for r in rs]
    ddp_bytes = statistics.mean(r["sync_bytes"] for r in ddp) if ddp else None
    ref_names = {"Local Adam": "Local Adam", "DES-LOC": "DES-LOC"}
    def score(r: dict) -> float:  # the final validation loss, or the mean of the last --tail validations
        return statistics.mean(v for _, v in r["val"][-args.tail:]) if r["val"] else math.nan

    means = {key: mean_spread([score(r) for r in rs])[0] for key, rs in results.items()}
    rows, summary = [], {}
    for (name, k), rs in results.items():
        m, spread = mean_spread([score(r) for r in rs])
        sync = statistics.mean(r["sync_bytes"] for r in rs)
        allb = statistics.mean(r["all_bytes"] for r in rs)
        row = {"scheme": name, "k": k, "mean": m, "spread": spread, "losses": [score(r) for r in rs],
               "sync_bytes": sync, "all_bytes": allb, "seconds": [r["seconds"] for r in rs],
               "auto": rs[0].get("auto"), "inner_bytes": statistics.mean(r.get("inner_bytes", 0.0) for r in rs)}
        rel = {}
        for ref, label in (("DDP", "DDP"), ("Local Adam", "Local Adam"), ("DES-LOC", "DES-LOC")):
            key = (ref, args.k)
            if key in means and (name, k) != key:
                rel[label] = 100 * (m / means[key] - 1)
        row["rel_pct"] = rel
        summary[f"{name} K_x={k}"] = row
        kx = "auto" if name == "DES-LOC auto" else ("-" if name == "DDP" else str(k))
        rows.append([
            name, kx, f"{m:.4f} ± {spread:.4f}", " / ".join(f"{v:.4f}" for v in row["losses"]),
            *(f"{rel[l]:+.2f}%" if l in rel else "" for l in ("DDP", "Local Adam", "DES-LOC")),
            fmt_bytes(sync), f"{ddp_bytes / sync:.1f}x" if ddp_bytes and sync else "",
            fmt_bytes(allb), f"{ddp_bytes / allb:.1f}x" if ddp_bytes and allb else "",
            *([fmt_bytes(row["inner_bytes"]) if row["inner_bytes"] else "-"] if args.mode == "hierarchical" else []),
        ])
    del ref_names
    sets = dict(kv.split("=", 1) for kv in args.set)
    width, batch = sets.get("model.n_embd", "64"), sets.get("data.batch_size", "4" if args.smoke else "16")
    print(f"\nGPT example ({'smoke' if args.smoke else f'4 layers, width {width}'}), {args.devices} CPU processes "
          f"(gloo), {args.steps} steps, global batch {args.devices} x {batch} x 128 tokens, seeds {args.seeds}"
          f"{'; AdamW betas ' + str(tuple(args.betas)) if args.betas else ''}"
          f"{'; overrides ' + ' '.join(args.set) if args.set else ''}; final val loss = mean ± half "
          f"range over seeds ({'last validation' if args.tail == 1 else f'mean of the last {args.tail} validations'}, "
          f"{args.val_batches} batches per rank); bytes per rank (rank 0's ledger), "
          f"mean over seeds")
    print(markdown_table(["scheme", "K_x", "final val loss", "per seed", "vs DDP", "vs Local Adam", "vs DES-LOC",
                          "sync bytes", "x fewer (sync)", "all bytes", "x fewer (all)",
                          *(["inner bytes"] if args.mode == "hierarchical" else [])], rows))
    autos = [(key, row["auto"]) for key, row in summary.items() if row.get("auto")]
    for key, auto in autos:
        print(f"{key}: chose " + ", ".join(f"{k.split('/')[-1]}={v:g}" for k, v in auto.items()))
    out = {"args": {k: v for k, v in vars(args).items() if k != "model_overrides"}, "schemes": summary,
           "ddp_bytes": ddp_bytes}
    if args.json:
        write_json(args.json, out)
    if args.plot:
        plot(results, args, Path(args.plot))
        print(f"plot: {args.plot}")
    return out


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, ((name, k), rs) in enumerate(results.items()):
        label = f"{name}" if args.mode == "quality" or name != "DES-LOC" else f"DES-LOC K_x={k}"
        steps = [s for s, _ in rs[0]["val"]]
        losses = [statistics.mean(r["val"][j][1] for r in rs) for j in range(len(steps))]
        ls = "--" if "DDP" in name else "-"
        ax1.plot(steps, losses, ls, marker="o", ms=3, color=f"C{i % 10}", label=label)
        ax2.errorbar([statistics.mean(r["all_bytes"] for r in rs) / 1e6],
                     [statistics.mean(r["final_val_loss"] for r in rs)],
                     yerr=[mean_spread([r["final_val_loss"] for r in rs])[1]], fmt="o", color=f"C{i % 10}", label=label)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("validation loss (mean over seeds)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("MB sent per rank (ledger, setup excluded)")
    ax2.set_ylabel("final validation loss (mean ± half range)")
    ax2.grid(alpha=0.3, which="both")
    fig.suptitle(f"GPT example, {args.devices} CPU processes, {args.steps} steps, K_x={args.k}, seeds {args.seeds}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
