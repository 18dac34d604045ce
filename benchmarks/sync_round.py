"""Sync round cost on a 100 Mbit/s link: one DES-LOC averaging round vs bytes / bandwidth.

Two Lightning "nodes" (``Trainer(num_nodes=2, devices=1)``, one process each) run in two network
namespaces joined by a veth pair whose ends are limited to 100 Mbit/s with ``tc tbf`` (see
``slowlink.py``; set up and torn down here, root only). The model is a stack of ``Linear(width, width)``
layers of a known size. The strategy is ``DeslocStrategy`` with ``param_sync_every=1`` and both Adam
moments every 2 steps, so odd steps are parameter-only rounds (what a ``K_x`` step sends) and even
steps are full rounds (parameters + ``exp_avg`` + ``exp_avg_sq``: a Local Adam round). Each round is
timed on rank 0 after a barrier, around the strategy's own round (flatten, all-reduce, unflatten).

Model of the expected time: a 2-rank ring all-reduce of N bytes sends N/2 (reduce-scatter) plus N/2
(all-gather) bytes in each direction, and the link is full duplex, so ``expected = N / rate`` with
rate = 100 Mbit/s = 12.5 MB/s. In the same run, a raw ``torch.distributed.all_reduce`` of a flat
buffer of the same size is timed as the baseline. Target: measured / expected <= 1.2.

    sudo python benchmarks/sync_round.py            # 8.4 MB of parameters, 5 rounds of each kind
    python benchmarks/sync_round.py --smoke         # tiny model, seconds (loopback when not root)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402
from slowlink import SlowLink, can_make_link, python, run_two_nodes  # noqa: E402

MARK = "SYNC_ROUND_RESULT "


# ---------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_desloc import DeslocStrategy

    torch.set_num_threads(1)

    class TimedDesloc(DeslocStrategy):
        """The package's strategy; only the schedule's round is wrapped (a barrier, then a clock around
        it): the averaging call of the core's outermost level (``core.levels[-1].comm.average_``), set
        on that Comm instance, so the core's own calls go through it."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.timings: list[dict] = []

        def setup(self, trainer) -> None:
            super().setup(trainer)
            comm = self.core.levels[-1].comm
            inner = comm.average_

            def timed_round(tensors_by_category, **kwargs) -> None:
                dist.barrier()
                before = self.ledger.total_bytes
                start = time.perf_counter()
                inner(tensors_by_category, **kwargs)
                elapsed = time.perf_counter() - start
                states = sorted(c[len("state/"):] for c in tensors_by_category if c.startswith("state/"))
                self.timings.append({"step": self.core.optimizer_steps[0], "params": "params" in tensors_by_category,
                                     "states": states, "bytes": self.ledger.total_bytes - before, "seconds": elapsed})

            comm.average_ = timed_round

    class Blob(pl.LightningModule):
        def __init__(self, width: int, layers: int) -> None:
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
            self.raw: list[dict] = []

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

        def on_train_start(self) -> None:
            n = sum(p.numel() for p in self.parameters())
            for mult in (1, 3):
                for _ in range(args.raw_repeats):
                    buf = torch.ones(n * mult)
                    dist.barrier()
                    start = time.perf_counter()
                    dist.all_reduce(buf)
                    self.raw.append({"mult": mult, "bytes": buf.numel() * 4, "seconds": time.perf_counter() - start})

    torch.manual_seed(0)
    model = Blob(args.width, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    steps = 2 * (args.rounds + 1)
    data = DataLoader(TensorDataset(torch.randn(steps * 4, args.width)), batch_size=4)
    strategy = TimedDesloc(param_sync_every=1, state_sync_every={"exp_avg": 2, "exp_avg_sq": 2}, log_comm=False)
    trainer = pl.Trainer(accelerator="cpu", num_nodes=2, devices=1, strategy=strategy, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    if trainer.global_rank == 0:
        print(MARK + json.dumps({"n_params": n_params, "world_size": trainer.world_size, "rounds": strategy.timings,
                                 "raw": model.raw}), flush=True)
    # leave together and close gloo's connections now: left to interpreter exit, one node intermittently
    # aborted ("terminate called without an active exception") after its peer had gone
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver
def summarize(result: dict, rate: float) -> tuple[str, dict]:
    param_bytes = result["n_params"] * 4
    # step 1 and 2 (the first round of each kind) are warm-up
    kinds = {
        "DES-LOC parameter round (a K_x step)": [r for r in result["rounds"] if r["step"] > 2 and not r["states"]],
        "DES-LOC params + exp_avg + exp_avg_sq (Local Adam round)": [
            r for r in result["rounds"] if r["step"] > 2 and r["states"]],
    }
    raw = {
        "raw dist.all_reduce, 1x params buffer (baseline)": [r for r in result["raw"] if r["mult"] == 1][1:],
        "raw dist.all_reduce, 3x params buffer (baseline)": [r for r in result["raw"] if r["mult"] == 3][1:],
    }
    rows, summary = [], {}
    for name, rs in {**raw, **kinds}.items():
        nbytes = rs[0]["bytes"]
        secs = [r["seconds"] for r in rs]
        med = statistics.median(secs)
        expected = nbytes / rate
        summary[name] = {"bytes": nbytes, "median_s": med, "expected_s": expected, "ratio": med / expected}
        rows.append([name, f"{nbytes / 1e6:.2f}", str(len(secs)), f"{expected:.3f}", f"{med:.3f}",
                     f"{min(secs):.3f}", f"{max(secs):.3f}", f"{med / expected:.2f}x"])
    table = markdown_table(["round", "MB per rank", "n", "expected N/rate (s)", "median (s)", "min (s)", "max (s)",
                            "measured / expected"], rows)
    return table, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds of each kind; loopback when not root")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2, help="Linear(width, width) layers: 2 x 1024 = 8.4 MB")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of each kind (after one warm-up)")
    ap.add_argument("--raw-repeats", type=int, default=4, help="raw all-reduces per size (the first is warm-up)")
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--loopback", action="store_true", help="no namespaces: both nodes on 127.0.0.1")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", type=str, default=None, help="also write the summary here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.width, args.layers, args.rounds, args.raw_repeats, args.timeout = 64, 2, 2, 2, 120
    if args.worker:
        worker(args)
        return 0

    ok, why = can_make_link()
    use_link = ok and not args.loopback
    if not use_link:
        print(f"NOTE: no network namespaces ({why or '--loopback'}): both nodes on loopback, no rate limit; "
              "the ratio below is not the slow-link result.")
    link = SlowLink(rate=args.rate) if use_link else None
    argv = [python(), str(Path(__file__).resolve()), "--worker", "--width", str(args.width), "--layers",
            str(args.layers), "--rounds", str(args.rounds), "--raw-repeats", str(args.raw_repeats)]
    with tempfile.TemporaryDirectory(prefix="sync_round_") as tmp:
        logs = [Path(tmp) / "node0.log", Path(tmp) / "node1.log"]
        if link is not None:
            with link:
                print("link: " + "; ".join(link.commands()[-2:]).replace(link.namespaces[0], "NS0")
                      .replace(link.namespaces[1], "NS1").replace(link.devices[0], "VETH0")
                      .replace(link.devices[1], "VETH1"))
                codes = run_two_nodes(argv, link, logs, args.timeout)
        else:
            codes = run_two_nodes(argv, None, logs, args.timeout)
        texts = [p.read_text() for p in logs]
    if any(codes):
        for node, text in enumerate(texts):
            print(f"--- node {node} (exit {codes[node]}) ---\n{text[-3000:]}", file=sys.stderr)
        return 1
    line = next(ln for ln in texts[0].splitlines() if ln.startswith(MARK))
    result = json.loads(line[len(MARK):])
    rate = SlowLink(rate=args.rate).rate_bytes_per_s
    table, summary = summarize(result, rate)
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) = {result['n_params']:,} parameters "
          f"({result['n_params'] * 4 / 1e6:.2f} MB float32); world size {result['world_size']} (2 nodes x 1); "
          f"link {args.rate if link else 'loopback'}; expected = N / {rate / 1e6:.1f} MB/s")
    print()
    print(table)
    print()
    des = summary["DES-LOC parameter round (a K_x step)"]
    full = summary["DES-LOC params + exp_avg + exp_avg_sq (Local Adam round)"]
    raw1 = summary["raw dist.all_reduce, 1x params buffer (baseline)"]
    raw3 = summary["raw dist.all_reduce, 3x params buffer (baseline)"]
    print(f"ratio DES-LOC parameter round / (bytes / bandwidth): {des['ratio']:.2f}x (target <= 1.2x)"
          + ("" if link else "  [loopback: not meaningful]"))
    print(f"ratio DES-LOC parameter round / raw all-reduce of the same size (same run): "
          f"{des['median_s'] / raw1['median_s']:.2f}x")
    print(f"ratio full round / raw all-reduce of 3x the size (same run): {full['median_s'] / raw3['median_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"link": bool(link), "rate": args.rate, "summary": summary,
                                               "result": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
