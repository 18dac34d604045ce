"""Local-phase overhead: a DES-LOC step that averages nothing vs the same module under a plain Trainer.

    python benchmarks/overhead.py                 # 3 interleaved repeats, 30 warmup + 150 timed steps each
    python benchmarks/overhead.py --smoke         # tiny model, a few steps: checks that the script runs

Each measurement is a fresh Python process (``subprocess``), torch limited to 1 thread per process:

* ``plain x1``:   ``Trainer(accelerator="cpu", devices=1)``, no strategy argument, one process alone;
* ``plain x2``:   two such processes at once, independent (no process group): the same load on the
  2 cores as the DES-LOC run, without any strategy;
* ``DES-LOC``:    ``Trainer(devices=2, strategy=DeslocStrategy(param_sync_every=10**9))``, 2 ranks (gloo,
  spawn), so no averaging happens during the timed steps: this is the local phase.

A step's time is the wall time between consecutive ``on_train_batch_end`` callbacks (data loading,
forward, backward, Adam step and Lightning's hooks: the whole loop iteration). The module is an MLP
with a few million parameters, so the step is compute-bound. Reported: median ms/step per process, the
median over repeats, and the ratio baseline / DES-LOC (>= 1 means DES-LOC is not slower). The repeats
are interleaved (plain x1, plain x2, DES-LOC, plain x1, ...) so that slow drifts of the machine hit all
three alike. The machine's load average is printed: other work on a 2-core machine shows up directly.
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
from torch.utils.data import DataLoader  # noqa: E402

import lightning_desloc  # noqa: E402
from common import Batches, markdown_table, write_json  # noqa: E402

KINDS = ("plain x1", "plain x2", "DES-LOC")


# ----------------------------------------------------------------------------------------------- worker
# Module-level classes: the DES-LOC run starts its ranks with ``spawn``, which pickles the module.
class StepTimer(L.Callback):
    def __init__(self, out: str, warmup: int):
        self.out = out
        self.warmup = warmup
        self.ends: list[float] = []

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)  # also in spawned ranks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module):
        times = [(b - a) * 1e3 for a, b in zip(self.ends, self.ends[1:])][self.warmup:]
        path = Path(self.out).with_suffix(f".rank{trainer.global_rank}.json")
        path.write_text(json.dumps({"ms": times, "threads": torch.get_num_threads(), "world": trainer.world_size}))


class MLP(L.LightningModule):
    def __init__(self, width: int, batch: int, n_batches: int):
        super().__init__()
        self.width, self.batch, self.n_batches = width, batch, n_batches
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, 2 * width),
            torch.nn.GELU(), torch.nn.Linear(2 * width, width),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def train_dataloader(self):
        return DataLoader(Batches(self.n_batches, self.batch, self.width), batch_size=None, shuffle=False)


def _worker(kind: str, out: str, width: int, batch: int, warmup: int, steps: int, start_method: str) -> None:
    torch.set_num_threads(1)
    total = warmup + steps + 1
    common = dict(accelerator="cpu", max_steps=total, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  num_sanity_val_steps=0, callbacks=[StepTimer(out, warmup)])
    if kind == "DES-LOC":
        strategy = lightning_desloc.DeslocStrategy(param_sync_every=10**9, start_method=start_method,
                                                   log_comm=False)
        trainer = L.Trainer(devices=2, strategy=strategy, **common)
    else:
        trainer = L.Trainer(devices=1, **common)  # plain Lightning, no strategy argument
    L.seed_everything(0, verbose=False)
    model = MLP(width, batch, 4 * (warmup + steps + 2))
    n_params = sum(p.numel() for p in model.parameters())
    Path(out).with_suffix(".params").write_text(str(n_params))
    trainer.fit(model)


# ----------------------------------------------------------------------------------------- orchestrator
def _launch(kind: str, out: Path, args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--worker", kind, "--out", str(out), "--width", str(args.width),
           "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--start-method", args.start_method]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        output, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}):\n{output[-4000:]}")


def measure(kind: str, tmp: Path, tag: str, args) -> list[float]:
    """Median ms/step of each process of one run of ``kind``."""
    if kind == "plain x2":
        outs = [tmp / f"{tag}-a", tmp / f"{tag}-b"]
        _wait([_launch("plain x1", o, args) for o in outs])
        files = [o.with_suffix(".rank0.json") for o in outs]
    elif kind == "plain x1":
        out = tmp / tag
        _wait([_launch(kind, out, args)])
        files = [out.with_suffix(".rank0.json")]
    else:
        out = tmp / tag
        _wait([_launch(kind, out, args)])
        files = [out.with_suffix(".rank0.json"), out.with_suffix(".rank1.json")]
    medians = []
    for f in files:
        rec = json.loads(f.read_text())
        assert rec["threads"] == 1, rec["threads"]
        medians.append(statistics.median(rec["ms"]))
    return medians


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768, help="MLP width w: w -> 2w -> 2w -> w")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=150, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--start-method", default="spawn", choices=("spawn", "fork"))
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 warmup + 5 timed steps, 1 repeat")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.out, args.width, args.batch, args.warmup, args.steps, args.start_method)
        return {}
    if args.smoke:
        args.width, args.batch, args.warmup, args.steps, args.repeats = 32, 8, 2, 5, 1

    load_before = os.getloadavg()
    per_kind: dict[str, list[float]] = {k: [] for k in KINDS}  # one entry per process per repeat
    per_repeat: dict[str, list[float]] = {k: [] for k in KINDS}  # mean over the run's processes
    with tempfile.TemporaryDirectory(prefix="desloc-overhead-") as tmp:
        for rep in range(args.repeats):
            for kind in KINDS:
                medians = measure(kind, Path(tmp), f"{kind.replace(' ', '_')}-{rep}", args)
                per_kind[kind] += medians
                per_repeat[kind].append(statistics.mean(medians))
                print(f"[overhead] repeat {rep} {kind}: " + ", ".join(f"{m:.2f}" for m in medians) + " ms/step",
                      flush=True)
        n_params = int(next(Path(tmp).glob("*.params")).read_text())
    load_after = os.getloadavg()

    summary = {k: statistics.median(v) for k, v in per_repeat.items()}
    des = summary["DES-LOC"]
    rows = []
    for kind in KINDS:
        reps = ", ".join(f"{v:.2f}" for v in per_repeat[kind])
        rows.append([kind, f"{summary[kind]:.2f}", reps, f"{min(per_kind[kind]):.2f} - {max(per_kind[kind]):.2f}",
                     f"{summary[kind] / des:.3f}"])
    print(f"\nlocal-phase step time, MLP {args.width}->{2 * args.width}->{2 * args.width}->{args.width} "
          f"({n_params:,} params), Adam, batch {args.batch}, 1 torch thread per process, "
          f"{args.warmup} warmup + {args.steps} timed steps, {args.repeats} repeats")
    print(markdown_table(["run", "median ms/step", "per repeat", "range over processes",
                          "ratio baseline/DES-LOC"], rows))
    ratio_x1, ratio_x2 = summary["plain x1"] / des, summary["plain x2"] / des
    print(f"\nratio vs plain x1 (one process alone): {ratio_x1:.3f}; vs plain x2 (same 2-process load): "
          f"{ratio_x2:.3f}; target >= 0.97")
    print(f"load average before/after (1, 5, 15 min): {tuple(round(x, 2) for x in load_before)} / "
          f"{tuple(round(x, 2) for x in load_after)} on {os.cpu_count()} cores")
    out = {"summary_ms": summary, "per_repeat_ms": per_repeat, "per_process_ms": per_kind,
           "ratio_vs_plain_x1": ratio_x1, "ratio_vs_plain_x2": ratio_x2, "n_params": n_params,
           "load_before": load_before, "load_after": load_after}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
