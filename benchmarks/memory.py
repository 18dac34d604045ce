"""Peak memory of DES-LOC's operations, in model sizes P (bytes of the parameters).

For M = 2 and 4 processes (``torch.multiprocessing`` spawn, gloo; on CUDA one device per rank, NCCL when
there are M devices, else ``cuda:gloo`` on shared ones) every rank builds the same model (``--layers``
``Linear(width, width)`` layers, float32), takes one Adam step so that both moments exist, and measures
the peak of memory allocated *above what was live when the operation started*, for:

* ``round (exact)``: one :meth:`Comm.average_ <lightning_desloc.comm.Comm.average_>` of the parameters and
  both Adam moments, as a Local-Adam step of the schedule averages them;
* ``round bf16`` / ``round int8``: the same round with ``compression="bf16"`` / ``"int8"`` (the consensus
  snapshot int8 parameters are coded against is taken before, as the core keeps it);
* ``save``: :func:`lightning_desloc.checkpoint.save` of a Trainer-style checkpoint (module state dict,
  optimizer state dict): the consensus round and the files;
* ``resume``: what ``trainer.fit(ckpt_path=...)`` does on the local path: Lightning's ``TorchCheckpointIO``
  loads the main file (tensors back where they were saved), :func:`~lightning_desloc.checkpoint.load`
  checks and reads the rank's shard, and the module and optimizer load the result;
* ``calibration``: allocating one P-sized tensor, which must read 1.00 P (a check of the measure itself).

Each operation runs once unmeasured first (first-call effects: gloo's buffers, the int8 residual that
every later round replaces) and is measured the second time; the table shows the largest peak over ranks.
Targets: a round <= 1.1 P extra, a save <= 1.1 P extra on the device; the resume has none.

How memory is measured:

* CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() - memory_allocated()``
  (bytes the caching allocator handed out, not what it reserved);
* CPU: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free of c10's CPU
  allocator, through which every tensor storage comes, with its size and time. The profiler runs for
  the whole worker, each measured operation in a ``record_function`` window; the running sum of the
  events in time order is the live bytes at every moment, and its maximum inside a window minus its
  value at the window's start is the operation's peak extra: the CPU analogue of the CUDA number (the
  CPU allocator caches nothing, so it counts tensor storage only). Not counted, on either device: memory
  outside the tensor allocator (Python objects, the pickled bytes ``torch.save`` writes, gloo's and
  NCCL's internal buffers); on a GPU none of it is device memory. The profiler records the calling
  thread's allocations; the collectives work in place on tensors allocated there, which the
  ``calibration`` row and the exact round's 3 P flat buffer (params + both moments in one bucket at the
  default cap) bear out. Chosen over summing live storages from a ``TorchDispatchMode`` because it also
  sees allocations made inside C++ kernels and by ``torch.load``, and frees are exact. Except one kind:
  a buffer whose last reference a gloo thread drops (a finished work's, a moment after ``wait``) is
  freed outside the profiled thread, unseen, and counts as live to the end. The ``left at end`` column
  (live at the window's end minus at its start; 0 for a warmed-up round) shows how much that was, and
  the peak may include up to that much: on CPU the peaks are upper bounds that vary a little from run
  to run.

    python benchmarks/memory.py                       # 2.1M parameters (P = 8.02 MiB), M = 2 and 4, 30-50 s on 2 cores
    python benchmarks/memory.py --width 1024 --bucket-cap-mb 4 --workers 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402  (puts the repository on sys.path too)

#: operation -> target peak extra in P (None: no target)
TARGETS: dict[str, float | None] = {
    "calibration (one P-sized tensor)": None,
    "round (exact)": 1.1,
    "round bf16": 1.1,
    "round int8": 1.1,
    "save": 1.1,
    "resume (local path)": None,
}


# ---------------------------------------------------------------------------------------------- measuring
class PeakMeter:
    """Peak bytes allocated on ``device`` above those live when an operation starts, while it runs.

    CUDA: read from the caching allocator around each operation. CPU: the profiler runs from the meter's
    construction to :meth:`finish`, each operation inside a ``record_function`` window; then the running
    sum of all allocator events gives the live bytes at every moment, and the peak inside a window minus
    the live bytes at its start is the operation's peak extra. Profiling the whole worker, not each
    window alone, matters: the profiler reports no free of a block allocated before it started, so a
    window alone would miss an operation's frees of older tensors (the optimizer's replaced states, the
    int8 residual) and overstate its peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, int] = {}
        #: CPU only: live bytes at a window's end minus at its start. After a warmed-up round it should be 0;
        #: more is frees the profiler did not see (a gloo thread letting go last of a finished work's
        #: buffers frees them outside the profiled thread), which the peak then also counts
        self.left: dict[str, int] = {}
        self._windows: list[str] = []
        self._prof = None
        if device.type != "cuda":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def measure(self, name: str, op: Callable[[], Any]) -> None:
        gc.collect()
        if self._prof is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            op()
            torch.cuda.synchronize(self.device)
            self.peaks[name] = torch.cuda.max_memory_allocated(self.device) - start
            return
        from torch.profiler import record_function

        with record_function(f"{WINDOW}{name}"):
            op()
        self._windows.append(name)

    def finish(self) -> dict[str, int]:
        if self._prof is None:
            return self.peaks
        self._prof.__exit__(None, None, None)
        events = list(self._prof.profiler.kineto_results.events())
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        windows = {e.name()[len(WINDOW):]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith(WINDOW)}
        for name in self._windows:
            begin, end = windows[name]
            live = sum(nbytes for t, nbytes in memory if t < begin)  # allocations positive, frees negative
            start, peak = live, live
            for t, nbytes in memory:
                if begin <= t <= end:
                    live += nbytes
                    peak = max(peak, live)
            self.peaks[name] = peak - start
            self.left[name] = live - start
        return self.peaks


WINDOW = "memory.py::"


# ---------------------------------------------------------------------------------------------- one rank
def build(width: int, layers: int, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # rank-dependent gradients: the ranks' states differ, as between averages
        p.grad = torch.full_like(p, 0.01 * (dist.get_rank() + 1))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if args.device == "cuda":
        n = torch.cuda.device_count()
        device = torch.device("cuda", rank % n)
        torch.cuda.set_device(device)
        backend = "nccl" if n >= world else "cuda:gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        results = measure_all(args, device)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def measure_all(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from lightning_desloc import checkpoint
    from lightning_desloc.comm import Comm
    from lightning_desloc.compression import CompressionPlan, parse_compression
    from lightning_desloc.config import DeslocConfig
    from lightning_desloc.snapshot import ConsensusSnapshot
    from lightning_desloc.sync import DeslocSync

    meter = PeakMeter(device)  # before the model: on CPU every later allocation and free is seen
    model, optimizer = build(args.width, args.layers, device)
    params = list(model.parameters())
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    cap = int(args.bucket_cap_mb * 2**20)
    comm = Comm(device=device)

    def due() -> dict[str, list[torch.Tensor]]:
        return {"params": params,
                "state/exp_avg": [optimizer.state[p]["exp_avg"] for p in params],
                "state/exp_avg_sq": [optimizer.state[p]["exp_avg_sq"] for p in params]}

    def round_with(wire: str | None) -> Callable[[], None]:
        plan = None
        if wire is not None:
            snapshot = ConsensusSnapshot()
            snapshot.take(params)  # equal on every rank: the parameters are broadcast below
            plan = CompressionPlan(parse_compression(wire), anchor=snapshot)
        return lambda: comm.average_(due(), bucket_cap_bytes=cap, compression=plan)

    comm.broadcast_(params, src=0, bucket_cap_bytes=cap)  # one consensus to start from, as after setup
    core = DeslocSync(DeslocConfig(param_sync_every=4, bucket_cap_mb=args.bucket_cap_mb), comm=comm)
    core.attach([optimizer])
    ckpt_dir = Path(args.ckpt_dir)
    path = str(ckpt_dir / "memory.ckpt")

    def save() -> None:
        checkpoint.save(core, {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()],
                               "global_step": 1}, path)

    io = TorchCheckpointIO()  # the Trainer's default: map_location keeps each tensor where it was saved

    def resume() -> None:
        main, problem = checkpoint.read_main(path, io.load_checkpoint)
        checkpoint.check_main(core, problem)
        assert main is not None
        loaded, decision = checkpoint.load(core, path, main, modules=[model], info=lambda m: None,
                                           warn=lambda m: None)
        assert decision.path == "local", decision
        model.load_state_dict(loaded["state_dict"])
        optimizer.load_state_dict(loaded["optimizer_states"][0])

    kept: list[torch.Tensor] = []

    def calibration() -> None:
        kept.append(torch.empty(p_bytes, dtype=torch.uint8, device=device))

    ops = {"calibration (one P-sized tensor)": calibration, "round (exact)": round_with(None),
           "round bf16": round_with("bf16"), "round int8": round_with("int8"), "save": save,
           "resume (local path)": resume}
    for name, op in ops.items():
        dist.barrier()
        op()  # first call, unmeasured
        kept.clear()
        dist.barrier()
        meter.measure(name, op)
        kept.clear()
    return {"p_bytes": p_bytes, "peaks": meter.finish(), "left": meter.left, "device": str(device)}


# ---------------------------------------------------------------------------------------------- main
def run(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out_dir, tempfile.TemporaryDirectory() as ckpt_dir:
        args.ckpt_dir = ckpt_dir
        port = _free_port()
        mp.start_processes(worker, args=(world, port, args, out_dir), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    p_bytes = ranks[0]["p_bytes"]
    return {"world": world, "p_bytes": p_bytes, "device": ranks[0]["device"],
            "peaks": {op: max(r["peaks"][op] for r in ranks) for op in ranks[0]["peaks"]},
            "left": {op: max(r["left"].get(op, 0) for r in ranks) for op in ranks[0]["peaks"]}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for res in results:
        p = res["p_bytes"]
        for op, peak in res["peaks"].items():
            target = TARGETS.get(op)
            verdict = "-" if target is None else ("PASS" if peak <= target * p else "OVER")
            left = res.get("left", {}).get(op)
            rows.append([op, str(res["world"]), f"{peak / 2**20:.2f}", f"{peak / p:.2f}",
                         "-" if target is None else f"<= {target}", verdict,
                         "-" if left is None or not res.get("left") else f"{left / 2**20:.2f}"])
    return markdown_table(["operation", "M", "peak extra (MiB)", "peak extra (P)", "target (P)", "verdict",
                           "left at end (MiB)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512, help="Linear(width, width) layers")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="process counts M")
    parser.add_argument("--bucket-cap-mb", type=float, default=64.0,
                        help="largest flat buffer of one collective, MiB (the strategy's default: 64)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    results = [run(world, args) for world in args.workers]
    p = results[0]["p_bytes"]
    n_params = p // 4
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), {n_params:,} float32 parameters, "
          f"P = {p / 2**20:.2f} MiB; Adam; bucket cap {args.bucket_cap_mb:g} MiB; device {results[0]['device']} "
          f"({'max_memory_allocated' if args.device == 'cuda' else 'torch.profiler allocator events'})")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "ckpt_dir"},
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
