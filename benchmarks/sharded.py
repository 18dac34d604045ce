"""Sharded groups on a slow link: a model over one process's memory budget, FSDP2 inside each node.

Two Lightning "nodes" of 2 processes each (``Trainer(num_nodes=2, devices=2)``, 4 ranks) run in two
network namespaces joined by a slow link (``--link tbf``: veth + ``tc tbf``, no latency; ``--link delay``:
``delayline.DelayLink``, bandwidth and a one-way delay; ``--link none``: loopback), as
``slowlink.run_two_nodes`` starts them. Each node is a DES-LOC group (``group_size=2``): inside a node
the ranks talk over loopback, across nodes over the link. The same model, data and schedule run twice
in one invocation:

* ``unsharded``: ``DeslocStrategy(group_size=2)``, DDP inside each node (every rank holds the whole model
  and optimizer), DES-LOC across the nodes;
* ``sharded``: ``DeslocStrategy(group_size=2, shard_within_group=True)``, FSDP2 inside each node (the
  module shards each layer itself in ``configure_model``, over ``self.device_mesh["shard"]``), DES-LOC
  across the nodes on each rank's local shard.

The model is ``--layers`` ``Linear(width, width)`` layers (float32) regressing a fixed random teacher on
each rank's own data, trained with Adam. The **memory budget** (``--budget-mb``) is on what a rank keeps
for the whole run: parameters + gradients + Adam's two moments, measured from the local storages after
the first step (``lightning_desloc.sharding.local_storage_bytes``). The unsharded run needs 4 P per rank
and is over the budget (it is run anyway, as the comparison: on this machine the budget is a number, not
a device's size); the sharded run needs 4 P / 2 plus one layer gathered at a time by FSDP2.

Printed: memory per rank against the budget, bytes across groups per rank (the outer ledger's rounds,
and counted per category), the time per step (median over rank 0's steps after the first 5, and the
whole fit), the final training loss, and the sharded / unsharded ratios from this one invocation.

    sudo python benchmarks/sharded.py                         # 100 Mbit/s tbf link, width 512 x 8 layers
    sudo python benchmarks/sharded.py --link delay --latency-ms 25
    python benchmarks/sharded.py --smoke                      # tiny model, loopback when not root
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402
from delayline import DelayLink, can_make_delay_link  # noqa: E402
from slowlink import SlowLink, can_make_link, python, run_two_nodes  # noqa: E402

ROUND_CATEGORIES = ("params", "state/exp_avg", "state/exp_avg_sq")


# ---------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import time

    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader

    from lightning_desloc import DeslocStrategy
    from lightning_desloc.sharding import local_storage_bytes

    torch.set_num_threads(1)
    sharded = args.scheme == "sharded"

    class Stack(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers = []
            for _ in range(args.layers):
                layers += [nn.Linear(args.width, args.width), nn.Tanh()]
            self.net = nn.Sequential(*layers)
            self.teacher = torch.randn(args.width, args.width, generator=torch.Generator().manual_seed(1)) / args.width ** 0.5
            self.clock: list[float] = []
            self.losses: list[float] = []
            self.memory: dict = {}

        def configure_model(self) -> None:
            if self.device_mesh is None:
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["shard"]  # inside the node only: across nodes is DES-LOC's
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)  # one layer gathered at a time
            fully_shard(self.net, mesh=mesh)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(100 + self.trainer.global_rank)
            xs = [torch.randn(args.batch, args.width, generator=g) for _ in range(args.steps)]
            return DataLoader([(x, torch.tanh(x @ self.teacher)) for x in xs], batch_size=None)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.detach())  # read after the fit: no host sync per step
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=args.lr)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.clock.append(time.perf_counter())
            if not self.memory:
                params = list(self.parameters())
                opt = self.trainer.optimizers[0]
                states = [v for p in params for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
                self.memory = {"params": local_storage_bytes(params), "grads": local_storage_bytes([p.grad for p in params]),
                               "states": local_storage_bytes(states)}

    model = Stack()
    n_params = sum(p.numel() for p in model.parameters())
    strategy = DeslocStrategy(group_size=2, shard_within_group=sharded, param_sync_every=args.k, log_comm=False,
                              peer_timeout_s=None)
    trainer = pl.Trainer(accelerator="cpu", num_nodes=2, devices=2, strategy=strategy, max_steps=args.steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model)
    fit_s = time.perf_counter() - start
    steps = [b - a for a, b in zip(model.clock, model.clock[1:])]
    result = {"scheme": args.scheme, "rank": trainer.global_rank, "n_params": n_params, "memory": model.memory,
              "ledger": dict(strategy.ledger.bytes), "group_ledger": dict(strategy.group_ledger.bytes),
              "calls": strategy.ledger.calls, "rounds": strategy.ledger.rounds,
              "periods": {"params": args.k, **{k: v for k, v in strategy.core.schedule.state_sync_every.items()
                                               if k in ("exp_avg", "exp_avg_sq")}},
              "step_s": steps, "fit_s": fit_s, "loss_first": float(model.losses[0]),
              "loss_last": float(torch.stack(model.losses[-5:]).mean())}
    # a file per rank: a node's two ranks share one log, where their lines may interleave
    Path(args.out, f"{args.scheme}-rank{trainer.global_rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--k", type=int, default=16, help="param_sync_every (the states: the strategy's defaults)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget-mb", type=float, default=25.0,
                        help="per rank: parameters + gradients + Adam moments, in MB (1e6 bytes)")
    parser.add_argument("--link", choices=("tbf", "delay", "none"), default="tbf")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--latency-ms", type=float, default=25.0, help="one way, with --link delay")
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, loopback unless root")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scheme", choices=("unsharded", "sharded"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.steps, args.k, args.batch = 64, 2, 12, 4, 4
        args.budget_mb = 4 * (args.layers * (args.width ** 2 + args.width) * 4) / 1e6 * 0.75
    if args.worker:
        worker(args)
        return 0

    link_ok, why = (can_make_delay_link() if args.link == "delay" else can_make_link()) if args.link != "none" else (False, "--link none")
    if args.link != "none" and not link_ok and not args.smoke:
        print(f"cannot build the {args.link} link ({why}); run as root, or pass --link none for loopback", file=sys.stderr)
        return 2
    where = "loopback" if not link_ok else (f"{args.rate} tbf" if args.link == "tbf" else f"{args.rate}, {args.latency_ms:g} ms one way")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("unsharded", "sharded"):
            argv_ = [python(), str(Path(__file__).resolve()), "--worker", "--scheme", scheme, "--out", tmp,
                     *(f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("width", "layers", "batch", "steps", "k", "lr"))]
            logs = [Path(tmp, f"{scheme}-node{n}.log") for n in range(2)]
            link = None
            if link_ok:
                link = DelayLink(rate=args.rate, delay_ms=args.latency_ms) if args.link == "delay" else SlowLink(rate=args.rate)
            if link is not None:
                with link:
                    codes = run_two_nodes(argv_, link, logs, args.timeout)
            else:
                codes = run_two_nodes(argv_, None, logs, args.timeout)
            texts = [p.read_text() for p in logs]
            if any(codes):
                for node, text in enumerate(texts):
                    print(f"--- {scheme} node {node} (exit {codes[node]}) ---\n{text[-4000:]}", file=sys.stderr)
                return 1
            files = [Path(tmp, f"{scheme}-rank{r}.json") for r in range(4)]
            if not all(f.exists() for f in files):
                print(f"--- {scheme}: a rank wrote no result ---\n{texts[0][-4000:]}", file=sys.stderr)
                return 1
            runs[scheme] = [json.loads(f.read_text()) for f in files]

    first = runs["unsharded"][0]
    n = first["n_params"]
    print(f"\nsharded groups: 2 nodes x 2 ranks (group_size=2), link {where}; model {args.layers} x "
          f"Linear({args.width}, {args.width}) = {n:,} parameters, P = {n * 4 / 1e6:.2f} MB float32; "
          f"{args.steps} steps, batch {args.batch}, periods {first['periods']}; budget {args.budget_mb:g} MB per rank\n")
    rows, summary = [], {}
    for scheme, results in runs.items():
        mem = max(sum(r["memory"].values()) for r in results) / 1e6
        across = max(sum(r["ledger"].get(c, 0) for c in ROUND_CATEGORIES) for r in results) / 1e6
        total_across = max(sum(r["ledger"].values()) for r in results) / 1e6
        step = statistics.median(results[0]["step_s"][5:] or results[0]["step_s"])
        # step_s[j] is the duration of step j + 2 (from the end of step j + 1 to the end of step j + 2)
        with_round = [d for j, d in enumerate(results[0]["step_s"]) if (j + 2) % args.k == 0]
        round_step = statistics.mean(with_round) if with_round else float("nan")
        summary[scheme] = {"memory_mb": mem, "across_mb": across, "step_s": step, "round_step_s": round_step,
                           "fit_s": results[0]["fit_s"]}
        rows.append([scheme, f"{mem:.3g}", "yes" if mem <= args.budget_mb else "NO", f"{across:.3g}", f"{total_across:.3g}",
                     f"{step * 1e3:.0f}", f"{round_step * 1e3:.0f}", f"{results[0]['fit_s']:.1f}",
                     f"{statistics.mean(r['loss_first'] for r in results):.4f} -> {statistics.mean(r['loss_last'] for r in results):.4f}"])
    print(markdown_table(["run", "params+grads+moments per rank (MB)", f"within {args.budget_mb:g} MB",
                          "rounds across groups per rank (MB)", "all across groups per rank (MB)",
                          "median step (ms)", "mean step with a round (ms)", "fit (s)", "training loss first -> last 5"], rows))
    s, u = summary["sharded"], summary["unsharded"]
    print(f"\nsharded / unsharded: memory {s['memory_mb'] / u['memory_mb']:.2f}x, bytes across groups "
          f"{s['across_mb'] / u['across_mb']:.2f}x, median step {s['step_s'] / u['step_s']:.2f}x, step with a round "
          f"{s['round_step_s'] / u['round_step_s']:.2f}x, "
          f"fit {s['fit_s'] / u['fit_s']:.2f}x")
    per_category = {c: [r["ledger"].get(c, 0) for r in runs["sharded"]] for c in ROUND_CATEGORIES}
    print(f"sharded, bytes per rank per category across groups: {per_category}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
