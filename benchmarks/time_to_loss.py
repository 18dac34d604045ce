"""Time to loss on a 100 Mbit/s link: the GPT example, DDP vs Local Adam vs DES-LOC, 2 nodes x 1 process.

The link is the one of ``sync_round.py`` (two network namespaces, veth, ``tc tbf rate 100mbit``;
built and removed here, root only). Each run is ``examples/gpt/train.py fit --config
configs/gpt-tiny-{ddp,local-adam,desloc}.yaml`` with ``--trainer.num_nodes=2 --trainer.devices=1``,
one node per namespace, plus the same overrides for all runs:

* ``--model.n_embd`` (default 128: 842,496 parameters) and ``--data.batch_size`` (default 2 sequences
  of 128 bytes per rank and step): a small per-step compute (~30 ms here) against DDP's per-step
  gradient all-reduce (3,369,984 bytes, ~270 ms at 12.5 MB/s), the slow-link regime;
* ``--model.min_lr_ratio=1.0``: constant learning rate after warm-up, so that the learning-rate schedule
  does not depend on ``max_steps`` and runs of different lengths are comparable step by step;
* validation every ``--val-every`` steps on ``--val-batches`` batches (the consensus model under DES-LOC).

DDP runs ``--steps`` steps; its final validation loss is the target. Local Adam and DES-LOC (for each
``--k``: Local Adam with every state on period K, DES-LOC with ``K_x = K`` and the states on 3K and 6K;
``auto``: DES-LOC with ``param_sync_every="auto"``, which times the link itself) then run until their validation loss is at or below the target (at most ``--local-factor`` x steps).
The clock (``slowlink.TrainClock``) is training wall clock from the first batch, without the
validation passes (identical work in every run). Time to target = clock at the first validation at or
below the target. Speed-ups are ratios of those times, all from this one invocation. Bytes to the
target are the strategy's ledger (rank 0) at that validation without the setup broadcast, which DDP pays
too; for DDP one gradient per step (``common.bytes_sent_by_step``).

``--link delay`` runs every node pair over ``delayline.DelayLink`` instead (tun devices and a userspace
delay line: ``--rate`` and ``--latency-ms`` one way, default 25 ms); ``--overlap-steps TAU`` adds, for each
numeric ``--k``, a DES-LOC run with ``overlap_steps=TAU`` (``k-1``: K - 1) next to the blocking one;
``--variants SPEC`` adds one with any mix of ``F`` (``fragments``), ``tau`` (``overlap_steps``) and ``lam``
(``overlap_local_weight``): ``F=4,tau=1`` is ``fragments=4, overlap_steps=1``, labelled
"DES-LOC (K_x=8, F=4, tau=1)"; ``tau=k-1,lam=0.5`` is ``overlap_steps=K_x - 1, overlap_local_weight=0.5``.

    sudo python benchmarks/time_to_loss.py                 # ~8.5 minutes
    sudo python benchmarks/time_to_loss.py --link delay --latency-ms 25 --k 8 --overlap-steps k-1
    sudo python benchmarks/time_to_loss.py --link delay --k 8 --no-local-adam --variants F=4,tau=1 F=2,tau=3
    python benchmarks/time_to_loss.py --smoke              # tiny model and corpus, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402
from gptrun import REPO, SMOKE_DATA_BYTES, SMOKE_MODEL, SMOKE_VAL_EVERY, Metrics, dump, ensure_data, gpt_argv, read_metrics  # noqa: E402
from slowlink import SlowLink, can_make_link, run_two_nodes  # noqa: E402
from delayline import DelayLink, can_make_delay_link  # noqa: E402


def time_to(metrics: Metrics, target: float) -> Optional[tuple[int, float]]:
    for step, loss, train_s, _ in metrics.val:
        if train_s is not None and loss <= target:
            return step, train_s
    return None


VARIANT_KEYS = {"F": "fragments", "tau": "overlap_steps", "lam": "overlap_local_weight"}


def parse_variant(spec: str) -> dict[str, str]:
    """``"F=4,tau=1"`` -> ``{"F": "4", "tau": "1"}`` (the label's order: F, tau, lam), checked.

    >>> parse_variant("tau=3,F=2")
    {'F': '2', 'tau': '3'}
    >>> parse_variant("lam=0.5,tau=k-1")
    {'tau': 'k-1', 'lam': '0.5'}
    >>> parse_variant("fragments=2")
    Traceback (most recent call last):
    ...
    ValueError: --variants takes F=N, tau=N (or tau=k-1) and lam=X joined by commas, e.g. F=4,tau=1; got 'fragments=2'
    """
    out = {}
    for word in spec.split(","):
        name, _, value = word.partition("=")
        ok = (value.replace(".", "", 1).isdigit() if name == "lam"
              else value.isdigit() or (name == "tau" and value == "k-1"))
        if name not in VARIANT_KEYS or not ok:
            raise ValueError("--variants takes F=N, tau=N (or tau=k-1) and lam=X joined by commas, e.g. F=4,tau=1; "
                             f"got {spec!r}")
        out[name] = value
    return {name: out[name] for name in VARIANT_KEYS if name in out}


def run_dir_name(label: str) -> str:
    """The directory under ``--out`` of the run labelled ``label`` ("DES-LOC (K_x=8)" -> "des-loc-k_x8")."""
    return label.lower().replace(" ", "-").replace("=", "").replace("(", "").replace(")", "").replace(",", "")


def plot(results: dict[str, Metrics], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw(ax, results, target, title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw(ax, results: dict[str, Metrics], target: float, title: str) -> None:
    """Validation loss against training wall clock, one line per run, the target dashed."""
    for label, m in results.items():
        pts = [(t, loss) for _, loss, t, _ in m.val if t is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target: DDP final {target:.3f}")
    ax.set_xlabel("training wall clock (s), validation passes excluded")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and corpus, few steps; loopback when not root")
    ap.add_argument("--steps", type=int, default=600, help="DDP's max_steps (the target is its final val loss)")
    ap.add_argument("--k", nargs="+", default=["8", "auto"],
                    help="K (= K_x for DES-LOC) values to run; 'auto' runs DES-LOC with param_sync_every=auto only")
    ap.add_argument("--comm-budget", type=float, default=None, help="with --k auto: the strategy's comm_budget")
    ap.add_argument("--local-factor", type=float, default=2.0, help="local runs stop at the target or this x steps")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--val-batches", type=int, default=32)
    ap.add_argument("--n-embd", type=int, default=128,
                    help="GPT width (the config has 64); wider puts more bytes on the link per step")
    ap.add_argument("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"), default=None,
                    help="AdamW betas of every run (default: the config's 0.9 0.95)")
    ap.add_argument("--seed", type=int, default=None, help="--seed_everything of every run (default: the configs' 1234)")
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--link", choices=["tbf", "delay"], default="tbf",
                    help="tbf: veth + tc tbf (no latency); delay: tun devices + delayline.DelayLink (--latency-ms)")
    ap.add_argument("--latency-ms", type=float, default=25.0, help="with --link delay: one-way delay")
    ap.add_argument("--overlap-steps", nargs="+", default=[],
                    help="for each numeric --k, also DES-LOC with overlap_steps=TAU ('k-1': K - 1)")
    ap.add_argument("--variants", nargs="+", default=[], metavar="SPEC",
                    help="for each numeric --k, also DES-LOC with these options: 'F=4,tau=1' is fragments=4, "
                         "overlap_steps=1 ('tau=k-1': K - 1); 'lam=0.5' is overlap_local_weight=0.5")
    ap.add_argument("--no-local-adam", action="store_true", help="skip the Local Adam runs")
    ap.add_argument("--loopback", action="store_true", help="no namespaces: both nodes on 127.0.0.1")
    ap.add_argument("--out", default="runs/slow-link/time-to-loss", help="CSV logs (one directory per run)")
    ap.add_argument("--png", default="docs/slow-link-time-to-loss.png")
    ap.add_argument("--data-dir", default="data/gpt-stdlib")
    ap.add_argument("--timeout", type=float, default=900, help="per run, seconds")
    ap.add_argument("--analyze-only", action="store_true",
                    help="run nothing: rebuild the table, summary.json and plot from the CSV logs under --out")
    args = ap.parse_args()
    try:
        variants = [parse_variant(v) for v in [f"tau={t}" for t in args.overlap_steps] + args.variants]
    except ValueError as err:
        ap.error(str(err))
    extra: list[str] = ["--model.min_lr_ratio=1.0"]
    tmp = None
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="ttl_smoke_")
        args.steps, args.k, args.val_every, args.val_batches, args.batch_size = 6, [2], 3, 2, 2
        args.n_embd = None  # the smoke model's own width
        args.out, args.png, args.data_dir, args.timeout = f"{tmp}/runs", f"{tmp}/ttl.png", f"{tmp}/data", 180
        extra += SMOKE_MODEL
    extra += [f"--data.data_dir={args.data_dir}", f"--data.batch_size={args.batch_size}",
              f"--trainer.val_check_interval={args.val_every}", f"--trainer.limit_val_batches={args.val_batches}",
              "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.callbacks+=slowlink.TrainClock"]
    if args.seed is not None:
        extra.append(f"--seed_everything={args.seed}")
    if args.n_embd is not None:
        extra.append(f"--model.n_embd={args.n_embd}")
    if args.betas is not None:
        extra.append(f"--model.betas=[{args.betas[0]},{args.betas[1]}]")
    try:
        if args.smoke:
            ensure_data(args.data_dir, SMOKE_DATA_BYTES, val_every=SMOKE_VAL_EVERY)
        else:
            ensure_data(args.data_dir, 4_000_000)
        ok, why = can_make_delay_link() if args.link == "delay" else can_make_link()
        use_link = ok and not args.loopback
        if not use_link:
            print(f"NOTE: no network namespaces ({why or '--loopback'}): both nodes on loopback, no rate limit; "
                  "the ratios below are not slow-link results.")
        out = Path(args.out)
        if not out.is_absolute():
            out = REPO / out
        env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}

        results: dict[str, Metrics] = {}
        commands: dict[str, list[str]] = {}

        def run(label: str, config: str, k: Optional[int], max_steps: int, stop_below: Optional[float]) -> Metrics:
            name = run_dir_name(label)
            argv = gpt_argv(config, save_dir=out, name=name, k=k, extra=(*extra, f"--trainer.max_steps={max_steps}"))
            commands[label] = argv
            if args.analyze_only:
                results[label] = m = read_metrics(out / name)
                return m
            shutil.rmtree(out / name, ignore_errors=True)
            (out / name).mkdir(parents=True, exist_ok=True)
            run_env = dict(env)
            if stop_below is not None:
                run_env["SLOWLINK_STOP_BELOW"] = repr(stop_below)
            logs = [out / name / "node0.log", out / name / "node1.log"]
            if not use_link:
                link = None
            elif args.link == "delay":
                link = DelayLink(rate=args.rate, delay_ms=args.latency_ms)
            else:
                link = SlowLink(rate=args.rate)
            start = time.perf_counter()
            if link is not None:
                with link:
                    codes = run_two_nodes(argv, link, logs, args.timeout, extra_env=run_env)
                if isinstance(link, DelayLink) and link.stats:
                    st = link.stats
                    print(f"[{label}] delay line: MB a->b {st['bytes'][0] / 1e6:.1f}, b->a {st['bytes'][1] / 1e6:.1f}, "
                          f"dropped {st['dropped']}", flush=True)
            else:
                codes = run_two_nodes(argv, None, logs, args.timeout, extra_env=run_env)
            wall = time.perf_counter() - start
            if any(codes):
                for node, log in enumerate(logs):
                    print(f"--- {label} node {node} (exit {codes[node]}) ---\n{log.read_text()[-3000:]}", file=sys.stderr)
                raise SystemExit(1)
            m = read_metrics(out / name)
            print(f"[{label}] {m.val[-1][0]} steps, final val loss {m.val[-1][1]:.4f}, process wall {wall:.1f} s",
                  flush=True)
            results[label] = m
            return m

        ddp = run("DDP", "ddp", None, args.steps, None)
        target = ddp.val[-1][1]
        local_steps = int(round(args.steps * args.local_factor))
        for k in args.k:
            if k == "auto":
                budget = ([f"--trainer.strategy.init_args.comm_budget={args.comm_budget}"]
                          if args.comm_budget is not None else [])
                extra.extend(budget)
                run(f"DES-LOC (K_x={k})", "desloc", k, local_steps, target)
                del extra[len(extra) - len(budget):]
                continue
            if not args.no_local_adam:
                run(f"Local Adam (K={k})", "local-adam", k, local_steps, target)
            run(f"DES-LOC (K_x={k})", "desloc", k, local_steps, target)
            for variant in variants:
                opts = {name: int(k) - 1 if v == "k-1" else float(v) if name == "lam" else int(v)
                        for name, v in variant.items()}
                options = [f"--trainer.strategy.init_args.{VARIANT_KEYS[name]}={v}" for name, v in opts.items()]
                extra.extend(options)
                run(f"DES-LOC (K_x={k}, " + ", ".join(f"{n}={v}" for n, v in opts.items()) + ")", "desloc", k,
                    local_steps, target)
                del extra[len(extra) - len(options):]

        ddp_t = time_to(ddp, target)
        assert ddp_t is not None
        rows = []
        summary = {"target": target, "runs": {}}
        for label, m in results.items():
            hit = time_to(m, target)
            k = None if label == "DDP" else label.split("=")[1].split(",")[0].rstrip(")")
            la = results.get(f"Local Adam (K={k})") if k else None
            la_t = time_to(la, target) if la is not None else None
            last_step, _, last_t, _ = [v for v in m.val if v[2] is not None][-1]
            per_step = last_t / last_step
            if hit is None:
                rows.append([label, "not reached", f"> {last_t:.1f}", f"{per_step * 1e3:.0f}", f"{min(v[1] for v in m.val):.4f}",
                             "-", "-", "-"])
                summary["runs"][label] = {"reached": False, "ms_per_step": per_step * 1e3}
                continue
            step, t = hit
            vs_ddp = ddp_t[1] / t
            vs_la = (la_t[1] / t) if (la_t and label.startswith("DES-LOC")) else None
            # Local Adam stopped short of the target: its whole run is a lower bound on its time to it
            la_short = la is not None and la_t is None and label.startswith("DES-LOC")
            la_bound = ([v[2] for v in la.val if v[2] is not None][-1] / t) if la_short else None
            sent = m.bytes_at(step)
            rows.append([label, str(step), f"{t:.1f}", f"{per_step * 1e3:.0f}", f"{m.val[-1][1]:.4f}", f"{vs_ddp:.2f}x",
                         f"{vs_la:.2f}x" if vs_la else (f"> {la_bound:.2f}x" if la_bound else "-"),
                         f"{sent / 1e6:.2f}" if sent is not None else "?"])
            summary["runs"][label] = {"reached": True, "step": step, "seconds": t, "ms_per_step": per_step * 1e3,
                                      "bytes_to_target": sent,
                                      "speedup_vs_ddp": vs_ddp, "speedup_vs_local_adam": vs_la,
                                      "speedup_vs_local_adam_at_least": la_bound,
                                      "command": " ".join(commands[label])}
        link_desc = ((f"{args.rate} delay line (tun + forwarder), {args.latency_ms:g} ms one way, 2 nodes x 1 process"
                      if args.link == "delay" else f"{args.rate} veth + tc tbf, 2 nodes x 1 process")
                     if use_link else "loopback, 2 nodes x 1 process")
        print()
        grad_mb = ddp.last.get("model/grad_bytes_per_step", float("nan")) / 1e6
        betas = f"AdamW betas {tuple(args.betas)}" if args.betas else "the config's AdamW betas (0.9, 0.95)"
        print(f"target: DDP's final validation loss after {args.steps} steps = {target:.4f}; link: {link_desc}; "
              f"batch {args.batch_size} x 128 tokens per rank and step; {grad_mb:.2f} MB of gradients per step; {betas}")
        print()
        print(markdown_table(["run", "steps to target", "train wall clock to target (s)", "ms per step",
                              "last val loss", "speed-up vs DDP", "speed-up vs Local Adam (same K)",
                              "MB sent per rank to target"], rows))
        print()
        for k in args.k:
            d = summary["runs"].get(f"DES-LOC (K_x={k})", {})
            if k == "auto":
                continue
            for lab, r in summary["runs"].items():
                if lab.startswith(f"DES-LOC (K_x={k}, "):
                    print(f"{lab}: " + (f"reached the target {r['speedup_vs_ddp']:.2f}x faster than DDP"
                                        + (f", {d['seconds'] / r['seconds']:.2f}x faster than blocking DES-LOC"
                                           if d.get("reached") else "")
                                        if r.get("reached") else f"did not reach the target within {local_steps} steps"))
            la = summary["runs"].get(f"Local Adam (K={k})", {})
            if d.get("reached"):
                print(f"K_x={k}: DES-LOC reached the target {d['speedup_vs_ddp']:.2f}x faster than DDP (target >= 3x)"
                      + (f" and {d['speedup_vs_local_adam']:.2f}x faster than Local Adam (target >= 1.5x)"
                         if d.get("speedup_vs_local_adam") else
                         (f"; Local Adam did not reach the target in {local_steps} steps (DES-LOC more than "
                          f"{d['speedup_vs_local_adam_at_least']:.2f}x faster)" if la and not la.get("reached") else "")))
            else:
                print(f"K_x={k}: DES-LOC did not reach the target within {local_steps} steps")
        auto = summary["runs"].get("DES-LOC (K_x=auto)")
        if auto is not None:
            fixed = {lab: r for lab, r in summary["runs"].items()
                     if lab.startswith("DES-LOC") and lab != "DES-LOC (K_x=auto)" and r.get("reached")}
            chosen = {k.split("comm/auto/")[1]: v for k, v in results["DES-LOC (K_x=auto)"].last.items()
                      if k.startswith("comm/auto/")}
            print("auto chose " + ", ".join(f"{k}={v:g}" for k, v in sorted(chosen.items())))
            best = min(fixed.items(), key=lambda kv: kv[1]["bytes_to_target"]) if fixed else None
            if not auto.get("reached"):
                print("auto: DES-LOC did not reach the target")
            elif best is not None:
                ratio = best[1]["bytes_to_target"] / auto["bytes_to_target"]
                print(f"auto reached the target with {auto['bytes_to_target'] / 1e6:.2f} MB per rank in "
                      f"{auto['seconds']:.1f} s; best fixed by bytes: {best[0]} with {best[1]['bytes_to_target'] / 1e6:.2f} MB "
                      f"in {best[1]['seconds']:.1f} s ({ratio:.2f}x the bytes of auto)")
        png = Path(args.png)
        if not png.is_absolute():
            png = REPO / png
        plot(results, target, png, f"GPT example, {link_desc}")
        dump(summary, out / "summary.json")
        print(f"\nlogs: {args.out}/<run>/version_0/metrics.csv; plot: {args.png}")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
