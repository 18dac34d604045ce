"""Rounds overlapped with compute (``overlap_steps``) on a link with bandwidth and latency.

    python benchmarks/overlap.py                         # 100 Mbit/s, 25 ms one way, K_x = 32
    python benchmarks/overlap.py --mbit 100 --latency-ms 25 --k 32 --tau 24 --steps 192
    python benchmarks/overlap.py --smoke                 # tiny model, a few steps: checks that it runs
    python benchmarks/overlap.py --k 32 --tau 7 --fragments 4   # and both runs with fragments=4
    python benchmarks/overlap.py --link real             # the same over a real delay line (root): see below
    python benchmarks/overlap.py --link real --smoke

Three runs of the same 2-rank ``Trainer(devices=2, strategy=DeslocStrategy(...))`` fit, each a fresh
Python process, torch limited to 1 thread per rank:

* ``no communication``: ``param_sync_every`` longer than the run, so no round at all: the compute-only
  step time of the same processes under the same strategy;
* ``blocking``: DES-LOC at ``K_x`` (paper periods: ``K_u = 3 K_x``, ``K_v = 6 K_x``), every round
  waited for in the step that made it due;
* ``overlapped``: the same with ``overlap_steps=tau``;
* with ``--fragments F``: ``blocking, fragments`` and ``overlapped, fragments``, the same two with
  ``fragments=F`` (a fragment of about 1/F of the parameters averaged every K_x / F steps, each state of
  that fragment on its own period): the same bytes in all, each round about 1/F of them (the table's
  "largest round", from the ledger).

**The link is modelled, not built** (this kernel has no ``netem``, so a network namespace cannot add
latency): in every rank, ``torch.distributed``'s collectives are wrapped so that each one still runs
(over loopback) and additionally completes no earlier than a virtual link allows. The link carries one
transfer at a time, in issue order; a collective of ``n`` payload bytes between ``M`` ranks occupies it
for ``2 (M-1)/M * n / bandwidth + 2 (M-1) * latency`` seconds (a ring all-reduce: ``2(M-1)`` hops,
each a one-way latency), starting when it is issued or when the previous transfer ends, whichever is
later. A blocking collective returns then; an asynchronous one's ``wait()`` sleeps until then. So a
blocking round costs its full transfer time in the step, and an overlapped one only what is left of it
``tau`` steps later. What it leaves out: TCP's slow start and loss, and the CPU the real loopback
all-reduce takes (it is there, on the same 2 cores, in every run alike).

**``--link real``** builds the link instead (root; ``delayline.DelayLink``: two network namespaces, a tun
device in each, a userspace forwarder that serialises each packet at ``--mbit`` and holds it
``--latency-ms``): the same three runs, each as two Lightning "nodes" (``Trainer(num_nodes=2,
devices=1)``, one process per namespace, started by ``slowlink.run_two_nodes``: gloo over the tun
devices, ``GLOO_SOCKET_IFNAME``), nothing wrapped. There, TCP (slow start after idle, the
congestion window), gloo's own algorithm, and the forwarder's CPU (on the same cores) are all in the
numbers. ``limit`` is still the model's (the configured link's time per step). Without root, or
without ``ip`` or ``/dev/net/tun``, it runs the two nodes on loopback and says so (not a link result).

A step is the wall time between consecutive ``on_train_batch_end`` callbacks on rank 0; reported: the
mean over the timed steps (the timed window is a whole number of the longest period, so every kind of
round is in it in proportion), the median, and the ratio to the compute-only mean. ``limit`` is
``max(compute, link time per step)``: what perfect overlap would give. Two more lines, steadier than
the ratios on a shared machine (the three runs are sequential): the blocking run's round steps minus its
median step, by what the round carries (with the model's transfer time), and the overlapped run's steps
where a round starts and where it lands, minus its median step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common import Batches, markdown_table, write_json  # noqa: E402
from delayline import DelayLink, can_make_delay_link  # noqa: E402
from lightning_desloc import DeslocStrategy  # noqa: E402


# ----------------------------------------------------------------------------------------------- the link
class VirtualLink:
    """One rank's view of a serial link: ``occupy(n)`` books a transfer of ``n`` payload bytes and returns
    the monotonic time it ends (see the module docstring for the cost model)."""

    def __init__(self, bandwidth_Bps: float, latency_s: float, world: int) -> None:
        self.bandwidth, self.latency, self.world = bandwidth_Bps, latency_s, world
        self.free_at = 0.0
        self.busy_s = 0.0

    def cost(self, nbytes: int) -> float:
        hops = 2 * (self.world - 1)
        return hops / self.world * nbytes / self.bandwidth + hops * self.latency

    def occupy(self, nbytes: int) -> float:
        start = max(time.monotonic(), self.free_at)
        self.free_at = start + self.cost(nbytes)
        self.busy_s += self.free_at - start
        return self.free_at


class _LinkedWork:
    def __init__(self, work, done_at: float) -> None:
        self.work, self.done_at = work, done_at

    def wait(self, *args, **kwargs):
        out = self.work.wait(*args, **kwargs)
        time.sleep(max(0.0, self.done_at - time.monotonic()))
        return out

    def __getattr__(self, name):
        return getattr(self.work, name)


def put_on_link(link: VirtualLink) -> None:
    """Wrap this process's tensor collectives so that each also waits for ``link``."""
    def wrap(fn):
        def linked(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            done_at = link.occupy(nbytes)
            work = fn(tensor, *args, **kwargs)
            if kwargs.get("async_op"):
                return _LinkedWork(work, done_at)
            time.sleep(max(0.0, done_at - time.monotonic()))
            return work
        return linked

    for name in ("all_reduce", "broadcast"):
        setattr(dist, name, wrap(getattr(dist, name)))


# ----------------------------------------------------------------------------------------------- a run
class Mlp(L.LightningModule):
    def __init__(self, width: int, depth: int, steps: int, batch: int):
        super().__init__()
        self.width, self.steps, self.batch = width, steps, batch
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(Batches(self.steps, self.batch, self.width), batch_size=None, shuffle=False)


class StepTimes(Callback):
    def __init__(self, link_args, out: str):
        self.link_args, self.out, self.times, self.link = link_args, out, [], None

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)
        if self.link_args is not None:  # modelled link; None: the real one (or loopback), nothing wrapped
            self.link = VirtualLink(*self.link_args, world=trainer.world_size)
            put_on_link(self.link)

    def on_train_batch_end(self, trainer, *args):
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            ledger = trainer.strategy.ledger
            Path(self.out).write_text(json.dumps({"times": self.times,
                                                  "link_busy_s": self.link.busy_s if self.link else None,
                                                  "ledger_bytes": dict(ledger.bytes),
                                                  "largest_round_bytes": ledger.largest_round_bytes}))


def worker(args) -> None:
    kind = args.worker
    k_x = args.k if kind != "no communication" else 10**9
    real = args.link == "real"
    # real: one process per node, started by slowlink.run_two_nodes (the strategy's default popen launcher)
    strategy = DeslocStrategy(param_sync_every=k_x, overlap_steps=args.tau if kind.startswith("overlapped") else 0,
                              fragments=args.fragments if kind.endswith("fragments") else 1,
                              start_method="popen" if real else "spawn", log_comm=False)
    steps = args.warmup + args.steps
    nodes = {"num_nodes": 2, "devices": 1} if real else {"devices": 2}
    trainer = L.Trainer(accelerator="cpu", **nodes, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False,
                        callbacks=[StepTimes(None if real else (args.mbit * 1e6 / 8, args.latency_ms / 1e3), args.out)])
    trainer.fit(Mlp(args.width, args.depth, steps, args.batch))


# ----------------------------------------------------------------------------------------------- main
KINDS = ("no communication", "blocking", "overlapped")
FRAGMENT_KINDS = ("blocking, fragments", "overlapped, fragments")


def measure(args, kind: str, link=None) -> dict:
    """One run of ``kind``; with ``args.link == "real"`` two nodes over ``link`` (``None``: loopback)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--out", out] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("mbit", "latency_ms", "k", "tau", "steps", "warmup", "width", "depth", "batch", "link",
                     "fragments")]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        if args.link == "real":
            from slowlink import run_two_nodes

            logs = [Path(tmp) / f"node{i}.log" for i in range(2)]
            codes = run_two_nodes(cmd, link, logs, timeout=args.timeout, extra_env={"PYTHONWARNINGS": "ignore"})
            if codes != [0, 0] or not os.path.exists(out):
                tails = "\n".join(f"--- node {i} (exit {c}):\n{logs[i].read_text()[-2000:]}"
                                  for i, c in enumerate(codes))
                raise RuntimeError(f"{kind} run failed:\n{tails}")
        else:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")
        data = json.loads(Path(out).read_text())
    gaps = [b - a for a, b in zip(data["times"], data["times"][1:])][args.warmup - 1:]
    return {"mean_ms": 1e3 * statistics.fmean(gaps), "median_ms": 1e3 * statistics.median(gaps),
            "timed_steps": len(gaps), "link_busy_s": data["link_busy_s"], "ledger_bytes": data["ledger_bytes"],
            "largest_round_bytes": data["largest_round_bytes"],
            "gaps_ms": [round(1e3 * g, 3) for g in gaps]}


def round_stalls(gaps_ms: list, k: int, warmup: int) -> dict:
    """The blocking run's round steps minus its median step, by what the round carries (paper periods)."""
    med = statistics.median(gaps_ms)
    out: dict = {"params": [], "params + exp_avg": [], "params + exp_avg + exp_avg_sq": []}
    for j, gap in enumerate(gaps_ms):
        step = warmup + j + 1  # gaps_ms[j] is the batch after which global_step == warmup + j + 1
        if step % k == 0:
            kind = ("params + exp_avg + exp_avg_sq" if step % (6 * k) == 0 else
                    "params + exp_avg" if step % (3 * k) == 0 else "params")
            out[kind].append(gap - med)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbit", type=float, default=100.0, help="link bandwidth, Mbit/s")
    p.add_argument("--latency-ms", type=float, default=25.0, help="one-way latency, ms")
    p.add_argument("--k", type=int, default=None, help="K_x, optimizer steps (default 32; --smoke: 4)")
    p.add_argument("--tau", type=int, default=None, help="overlap_steps (default K_x - 1)")
    p.add_argument("--fragments", type=int, default=1,
                   help="F > 1: also the blocking and overlapped runs with fragments=F (tau below K_x / F)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6 K_x: every round kind once)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--link", choices=("model", "real"), default="model",
                   help="model: the virtual link inside each rank; real: two nodes over a delay line (root)")
    p.add_argument("--mtu", type=int, default=9000, help="--link real: the tun devices' MTU")
    p.add_argument("--timeout", type=float, default=600.0, help="--link real: seconds per run")
    p.add_argument("--no-slow-start-after-idle", action="store_true",
                   help="--link real: net.ipv4.tcp_slow_start_after_idle=0 in both namespaces")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.width, args.depth, args.batch, args.warmup = 32, 2, 8, 2
        args.k, args.steps = args.k or 4, args.steps or 24
    args.k = args.k or 32
    args.tau = args.k - 1 if args.tau is None else args.tau
    kinds = KINDS + (FRAGMENT_KINDS if args.fragments > 1 else ())
    args.steps = args.steps or 6 * args.k
    if args.worker:
        return worker(args)

    real_link, forwarder = None, None
    if args.link == "real":
        ok, why = can_make_delay_link()
        if not ok:
            print(f"NOTE: no delay line ({why}): both nodes on loopback, no bandwidth or latency limit; "
                  "not a link result")
            results = {kind: measure(args, kind) for kind in kinds}
        else:
            load = Path("/proc/loadavg").read_text().split()[0]
            sysctls = {"net.ipv4.tcp_slow_start_after_idle": "0"} if args.no_slow_start_after_idle else {}
            with DelayLink(rate=f"{args.mbit:g}mbit", delay_ms=args.latency_ms, mtu=args.mtu,
                           sysctls=sysctls) as real_link:
                results = {kind: measure(args, kind, real_link) for kind in kinds}
            forwarder = dict(real_link.stats or {}, loadavg_1min_before=load)
    else:
        results = {kind: measure(args, kind) for kind in kinds}
    n_params = args.depth * (args.width * args.width + args.width)
    compute = results["no communication"]["mean_ms"]
    link = VirtualLink(args.mbit * 1e6 / 8, args.latency_ms / 1e3, world=2)
    # a parameter round every K_x steps; the states ride on it, adding their bytes but no latency
    state_bytes_s = link.cost(4 * n_params) - link.cost(0)
    per_step_link_ms = 1e3 * (link.cost(4 * n_params) / args.k + state_bytes_s / (3 * args.k)
                              + state_bytes_s / (6 * args.k))
    limit = max(compute, per_step_link_ms)
    rows = []
    for kind in kinds:
        r = results[kind]
        sent = sum(v for c, v in r["ledger_bytes"].items() if c == "params" or c.startswith("state/"))
        rows.append([kind, args.k if kind != "no communication" else "-",
                     args.tau if kind.startswith("overlapped") else "-",
                     args.fragments if kind.endswith("fragments") else 1,
                     f"{r['mean_ms']:.1f}", f"{r['median_ms']:.1f}", f"{r['mean_ms'] / compute:.2f}x",
                     f"{limit / compute:.2f}x" if kind != "no communication" else "-",
                     f"{sent / 1e6:.2f}", f"{r['largest_round_bytes'] / 1e6:.2f}"])
    what = {"model": "virtual link", "real": "LOOPBACK (no link)" if real_link is None else
            "delay line (2 nodes, tun + forwarder" + (", no slow start after idle)" if real_link.sysctls else ")")}
    print(f"2 ranks, MLP {args.depth} x {args.width} ({n_params:,} params, {4 * n_params / 1e6:.1f} MB fp32), "
          f"batch {args.batch}; {what[args.link]} {args.mbit:g} Mbit/s, {args.latency_ms:g} ms one way "
          f"(a parameter round: {1e3 * link.cost(4 * n_params):.0f} ms); {results['blocking']['timed_steps']} timed steps")
    print(markdown_table(["run", "K_x", "tau", "F", "mean ms/step", "median ms/step", "vs compute", "limit vs compute",
                          "MB sent per rank", "largest round (MB)"], rows))
    print(f"link time per step at K_x={args.k} (params every K_x, exp_avg every 3 K_x, exp_avg_sq every 6 K_x): "
          f"{per_step_link_ms:.1f} ms; compute {compute:.1f} ms; limit max(compute, link) = {limit:.1f} ms")
    print(f"ratio blocking / overlapped: {results['blocking']['mean_ms'] / results['overlapped']['mean_ms']:.2f}x")
    if args.fragments > 1:
        f_block, f_over = results["blocking, fragments"], results["overlapped, fragments"]
        print(f"fragments={args.fragments}: largest round {f_block['largest_round_bytes'] / results['blocking']['largest_round_bytes']:.2f}x "
              f"the unfragmented one's; mean step blocking {f_block['mean_ms'] / results['blocking']['mean_ms']:.2f}x, "
              f"overlapped {f_over['mean_ms'] / results['overlapped']['mean_ms']:.2f}x the unfragmented runs'")
    stalls = round_stalls(results["blocking"]["gaps_ms"], args.k, args.warmup)
    model = {"params": link.cost(4 * n_params), "params + exp_avg": link.cost(8 * n_params),
             "params + exp_avg + exp_avg_sq": link.cost(12 * n_params)}
    print("blocking, a round's step minus the median step, ms (the model's transfer time): " + "; ".join(
        f"{kind}: {', '.join(f'{x:.0f}' for x in xs)} ({1e3 * model[kind]:.0f})" for kind, xs in stalls.items() if xs))
    g = results["overlapped"]["gaps_ms"]
    med = statistics.median(g)
    starts = [x - med for j, x in enumerate(g) if (args.warmup + j + 1) % args.k == 0]
    lands = [x - med for j, x in enumerate(g) if (args.warmup + j + 1) % args.k == args.tau % args.k
             and args.warmup + j + 1 > args.k]
    print("overlapped, minus the median step, ms: the step a round starts: " + ", ".join(f"{x:.0f}" for x in starts)
          + "; the step it lands: " + ", ".join(f"{x:.0f}" for x in lands))
    if forwarder:
        f = forwarder
        print(f"delay line over the three runs: {f['bytes'][0] / 1e6:.1f} MB a->b, {f['bytes'][1] / 1e6:.1f} MB b->a, "
              f"dropped {sum(f['dropped'])}, forwarder CPU {f['cpu_s']:.1f} s in {f['wall_s']:.0f} s "
              f"({100 * f['cpu_s'] / f['wall_s']:.1f} % of a core), latest delivery "
              f"{max(f['max_late_ms']):.1f} ms after due; load average before: {f['loadavg_1min_before']} "
              "(2 cores, shared)")
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results, "limit_ms": limit,
                               "link_per_step_ms": per_step_link_ms, "forwarder": forwarder})


if __name__ == "__main__":
    main()
