"""Cost of DES-LOC checkpoints: how long a save and a resume take and how many bytes they write and move.

    python benchmarks/checkpoint_bench.py            # MLP of ~4.2M float32 parameters, Adam, 2 ranks
    python benchmarks/checkpoint_bench.py --smoke    # tiny MLP: checks that the script runs (seconds)
    python benchmarks/checkpoint_bench.py --json results.json   # the raw numbers as well

Four Lightning fits on real processes (gloo, ``DeslocStrategy(start_method="spawn")``), each in a fresh
process group:

1. **save** (2 ranks): a few optimizer steps, so that the ranks' parameters and Adam states differ and
   exist; then, in ``on_train_end``, ``trainer.save_checkpoint(path)`` is called ``--repeats`` times on
   every rank (full, then ``weights_only=True``) and timed on rank 0 between two barriers. The time
   includes the consensus all-reduce, the shard written by every rank, the manifest, the main file and
   Lightning's closing barrier. For scale, ``torch.save`` of rank 0's own model and optimizer
   ``state_dict`` to a file, flushed and ``fsync``-ed (what a DDP-style rank-0 save writes, made as
   durable as DES-LOC's atomic writes), is timed too. The bytes on disk are the sizes of
   the main file, of the shards and of the manifest; the bytes moved are the ledger's ``checkpoint``
   category (payload bytes each rank hands to the all-reduce) and its ``control`` category (save id,
   shard checksums).
2. **resume, same size** (2 ranks, ``ckpt_path=path``): the local path;
3. **resume, 2 -> 1** (1 rank): the consensus path;
4. **fresh start** (2 ranks, no checkpoint): the baseline of the resume rows.

A resume is timed two ways on rank 0: ``load_checkpoint`` alone (read the main file, verify this rank's
shard against the manifest, agree on the path with the other ranks, take the local or consensus
state), and the whole stretch from the ``setup`` hook to ``on_train_start``, which also covers
Lightning loading the state into the module and optimizer and the strategy's own setup; the
fresh-start row gives that stretch without a checkpoint. Bytes moved on resume are the ledger bytes
rank 0 sent between process start and ``on_train_start`` (all categories: the path agreement and any
setup broadcast). Times are medians over ``--repeats`` (saves) or single runs (resumes); the files live
in a temporary directory (``--workdir`` to choose it), so the disk is whatever backs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_desloc import DeslocStrategy  # noqa: E402


def markdown_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------------------------------ the fits
class Batches(Dataset):
    """``length`` ready-made batches, different on every rank, cycling over a small pool."""

    def __init__(self, width: int, batch: int, length: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(4, batch, width, generator=g)
        self.y = torch.randn(4, batch, width, generator=g)
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.x[i % 4], self.y[i % 4]


class MLP(L.LightningModule):
    def __init__(self, width: int = 1024, hidden: int = 2048, batch: int = 16, steps: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, width))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x[0]), y[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        h = self.hparams
        return DataLoader(Batches(h.width, h.batch, h.steps, seed=10 + self.trainer.global_rank), batch_size=1)


class TimedDesloc(DeslocStrategy):
    """DeslocStrategy whose ``load_checkpoint`` is timed (the subclass adds nothing else)."""

    load_seconds = None

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        self.barrier("bench-load")
        t0 = time.perf_counter()
        out = super().load_checkpoint(checkpoint_path, weights_only)
        type(self).load_seconds = time.perf_counter() - t0
        return out


def _ledger(trainer) -> dict:
    return dict(trainer.strategy.ledger.bytes)


def _sub(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)}


class Probe(Callback):
    """Times setup -> on_train_start and, with ``saves`` > 0, the saves in ``on_train_end``; rank 0
    writes what it measured to ``<out>.json``."""

    def __init__(self, out: str, ckpt: str, saves: int = 0):
        self.out, self.ckpt, self.saves = out, ckpt, saves
        self.result: dict = {}

    def setup(self, trainer, pl_module, stage):
        trainer.strategy.barrier("bench-setup")
        self.t_setup = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.result["setup_to_train_start_s"] = time.perf_counter() - self.t_setup
        self.result["load_checkpoint_s"] = TimedDesloc.load_seconds
        decision = trainer.strategy.resume_decision
        self.result["resume_path"] = None if decision is None else decision.path
        self.result["ledger_at_train_start"] = _ledger(trainer)
        self.result["optimizer_steps"] = list(trainer.strategy.optimizer_steps)

    def _timed(self, trainer, fn) -> float:
        trainer.strategy.barrier("bench-save-start")
        t0 = time.perf_counter()
        fn()
        trainer.strategy.barrier("bench-save-end")
        return time.perf_counter() - t0

    def on_train_end(self, trainer, pl_module):
        if self.saves:
            for weights_only in (True, False):  # the full save last: it is the file the resumes read
                key = "weights_only" if weights_only else "full"
                times, moved = [], []
                for _ in range(self.saves):
                    before = _ledger(trainer)
                    times.append(self._timed(trainer, lambda: trainer.save_checkpoint(self.ckpt, weights_only=weights_only)))
                    moved.append(_sub(_ledger(trainer), before))
                self.result[f"save_{key}_s"] = times
                self.result[f"save_{key}_moved"] = moved[-1]
                self.result[f"save_{key}_files"] = file_sizes(self.ckpt) if trainer.global_rank == 0 else None
            # rank 0's own state with torch.save, as a DDP-style rank-0 save would write it
            plain = self.ckpt + ".plain.pt"
            opt = trainer.optimizers[0]
            times = []
            for _ in range(self.saves):
                t0 = time.perf_counter()
                if trainer.global_rank == 0:
                    with open(plain, "wb") as f:
                        torch.save({"state_dict": pl_module.state_dict(), "optimizer": opt.state_dict()}, f)
                        f.flush()
                        os.fsync(f.fileno())
                times.append(time.perf_counter() - t0)
            if trainer.global_rank == 0:
                self.result["plain_torch_save_s"] = times
                self.result["plain_bytes"] = os.path.getsize(plain)
                os.remove(plain)
        if trainer.global_rank == 0:
            with open(self.out + ".json", "w") as f:
                json.dump(self.result, f)


def file_sizes(main: str) -> dict:
    root = main + ".shards"
    (save_id,) = os.listdir(root)
    directory = os.path.join(root, save_id)
    shards = [f for f in os.listdir(directory) if f.startswith("rank-")]
    return {
        "main": os.path.getsize(main),
        "shards": sum(os.path.getsize(os.path.join(directory, f)) for f in shards),
        "n_shards": len(shards),
        "manifest": os.path.getsize(os.path.join(directory, "manifest.json")),
    }


def fit(workdir: str, name: str, devices: int, steps: int, hp: dict, ckpt_path=None, saves: int = 0) -> dict:
    out = os.path.join(workdir, name)
    probe = Probe(out, os.path.join(workdir, "bench.ckpt"), saves=saves)
    TimedDesloc.load_seconds = None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=TimedDesloc(param_sync_every=8, state_sync_every={"exp_avg": 16, "exp_avg_sq": 32}, start_method="spawn"),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        default_root_dir=workdir,
        callbacks=[probe],
    )
    trainer.fit(MLP(**hp, steps=steps), ckpt_path=ckpt_path)
    with open(out + ".json") as f:
        return json.load(f)


def saved_ledger(path: str, resume_path: str) -> dict:
    """The ledger a resume starts from: rank 0's shard (local path) or the main file's (consensus)."""
    main = torch.load(path, map_location="cpu", weights_only=True)
    meta = main["desloc"]
    if resume_path == "local":
        shard = os.path.join(path + ".shards", meta["save_id"], "rank-00000.pt")
        return torch.load(shard, map_location="cpu", weights_only=True)["ledger"]["bytes"]
    return meta["ledger"]["bytes"]


# ------------------------------------------------------------------------------------------ the table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny MLP (width 16, hidden 32), 1 save repeat")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed saves of each kind (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps before the saves")
    parser.add_argument("--workdir", help="where the checkpoints are written (default: a temporary directory)")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.hidden, args.repeats = 16, 32, 1
    hp = dict(width=args.width, hidden=args.hidden, batch=16)
    n_params = 2 * args.width * args.hidden + args.width + args.hidden
    workdir = args.workdir or tempfile.mkdtemp(prefix="desloc-ckpt-bench-")
    os.makedirs(workdir, exist_ok=True)
    torch.set_num_threads(1)
    try:
        L.seed_everything(0, verbose=False)
        save = fit(workdir, "save", 2, args.steps, hp, saves=args.repeats)
        ckpt = os.path.join(workdir, "bench.ckpt")
        local = fit(workdir, "local", 2, args.steps + 1, hp, ckpt_path=ckpt)
        consensus = fit(workdir, "consensus", 1, args.steps + 1, hp, ckpt_path=ckpt)
        fresh = fit(workdir, "fresh", 2, 1, hp)
        for res in (local, consensus):
            res["saved_ledger"] = saved_ledger(ckpt, res["resume_path"])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n_params": n_params, "save": save, "local": local, "consensus": consensus, "fresh": fresh}, f, indent=1)
    med = statistics.median
    rows = []
    for key, label in (("full", "save (full)"), ("weights_only", "save (weights_only=True)")):
        files, moved = save[f"save_{key}_files"], save[f"save_{key}_moved"]
        rows.append([
            label, f"{med(save[f'save_{key}_s']) * 1e3:.0f}", "-",
            human(files["main"]), f"{human(files['shards'])} ({files['n_shards']} files)",
            human(moved.get("checkpoint", 0)), human(sum(v for k, v in moved.items() if k != "checkpoint")),
        ])  # fmt: skip
    rows.append([
        "torch.save + fsync of rank 0's state (reference)", f"{med(save['plain_torch_save_s']) * 1e3:.0f}", "-",
        human(save["plain_bytes"]), "-", "-", "-",
    ])  # fmt: skip
    for res, label in ((local, "resume 2 -> 2"), (consensus, "resume 2 -> 1"), (fresh, "fresh start, 2 ranks (reference)")):
        ledger = res["ledger_at_train_start"]
        sent = sum(_sub(ledger, res.get("saved_ledger", {})).values())
        load = res["load_checkpoint_s"]
        rows.append([
            f"{label}: {res['resume_path'] or 'no checkpoint'} path" if res["resume_path"] else label,
            "-" if load is None else f"{load * 1e3:.0f}", f"{res['setup_to_train_start_s'] * 1e3:.0f}",
            "-", "-", "-", human(sent),
        ])  # fmt: skip
    headers = ["operation", "time (ms)", "setup -> train start (ms)", "main file", "shards",
               "moved: checkpoint", "moved: other categories"]  # fmt: skip
    print(f"\nDES-LOC checkpoint cost: MLP {args.width}-{args.hidden}-{args.width}, {n_params / 1e6:.2f}M float32 "
          f"parameters, Adam, {args.steps} steps before saving; gloo on CPU ({os.cpu_count()} cores, "
          f"{platform.machine()}), torch {torch.__version__}; save times: median of {args.repeats}\n")  # fmt: skip
    print(markdown_table(headers, rows))
    print(f"\nresume paths: 2 -> 2 {local['resume_path']} (optimizer steps {local['optimizer_steps']}), "
          f"2 -> 1 {consensus['resume_path']} (optimizer steps {consensus['optimizer_steps']})")  # fmt: skip


if __name__ == "__main__":
    main()
