"""A DES-LOC fit for the failure tests (tests/test_liveness.py), under torchrun or one process per "machine".

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 DESLOC_TEST_FAULT='{"rank": 1, "step": 12, "phase": "round", ...}' \
        python -m torch.distributed.run --standalone --nproc-per-node=2 --max-restarts=1 \
        tests/fault_worker.py --out OUT --peer-timeout 5

or, without torchrun, one process per machine (Lightning's own multi-node mode)::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=P NODE_RANK=r LOCAL_RANK=0 python tests/fault_worker.py --out OUT \
        --devices 1 --num-nodes 2

The model is tests/ckpt_models.py's float64 ``Net`` (Adam), ``--n-batches`` per epoch, every rank sleeping
``--step-sleep`` seconds per step; a checkpoint after every epoch (``epoch=E-step=S.ckpt``, and
``last.ckpt``: a file of its own overwritten by each save, or with ``--save-last link`` a link to the newest)
unless ``--no-checkpoints``. Every attempt
calls ``trainer.fit(model, ckpt_path=--ckpt)`` (``last``: the newest ``last.ckpt``). The fault comes from
:data:`faults.ENV` (:class:`faults.Fault`).

What it writes into ``--out``: ``events.jsonl``, one line per event of each rank and attempt (``start``,
``resumed`` with the file and its SHA-256, ``step`` for the first step of the attempt, ``end``) with
``time.time()``; ``rec/rank<r>.pt`` (:class:`ckpt_models.Recorder`); at the end ``final.ckpt`` (the
consensus) and, from rank 0, ``attempt.json`` (restart count and how the attempt resumed).
"""

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from ckpt_models import Net, Recorder  # noqa: E402
from faults import Fault, FaultInjector  # noqa: E402
from lightning_desloc import DeslocStrategy  # noqa: E402


class SlowNet(Net):
    def __init__(self, step_sleep: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.step_sleep = step_sleep

    def training_step(self, batch, batch_idx):
        if self.step_sleep:
            time.sleep(self.step_sleep)  # the time a real step takes: a fault lands in a long local phase
        return super().training_step(batch, batch_idx)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Events(Callback):
    """Appends this rank's events to ``events.jsonl`` (one ``write`` per line: lines of ranks do not mix)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "events.jsonl")
        self.stepped = False

    def write(self, trainer, event: str, **values) -> None:
        line = dict(event=event, rank=trainer.global_rank, pid=os.getpid(), time=time.time(),
                    attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), **values)
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_start(self, trainer, pl_module):
        decision = trainer.strategy.resume_decision
        if decision is not None:
            self.write(trainer, "resumed", path=decision.path, file=decision.resolved, step=trainer.global_step,
                       sha256=sha256(decision.resolved))
        else:
            self.write(trainer, "start", step=trainer.global_step)

    def on_train_batch_end(self, trainer, *args):
        if not self.stepped:
            self.stepped = True
            self.write(trainer, "step", step=trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self.write(trainer, "end", step=trainer.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default="last")
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--n-batches", type=int, default=5)
    parser.add_argument("--param-sync-every", type=int, default=3)
    parser.add_argument("--peer-timeout", default="5", help="seconds, or 'none'")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--no-checkpoints", action="store_true")
    parser.add_argument("--save-last", choices=["true", "link"], default="true",
                        help="last.ckpt as a file of its own, overwritten by every save, or a link to the newest")
    parser.add_argument("--devices", type=int, default=int(os.environ.get("LOCAL_WORLD_SIZE", "2")))
    parser.add_argument("--num-nodes", type=int,
                        default=int(os.environ.get("WORLD_SIZE", "2")) // int(os.environ.get("LOCAL_WORLD_SIZE", "2")))
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    L.seed_everything(0)
    callbacks = [Recorder(os.path.join(args.out, "rec")), Events(args.out), FaultInjector(Fault.from_env())]
    if not args.no_checkpoints:
        callbacks.insert(0, ModelCheckpoint(dirpath=os.path.join(args.out, "ckpts"), every_n_epochs=1, save_top_k=-1,
                                            save_last=True if args.save_last == "true" else "link"))
    k_x = args.param_sync_every
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=DeslocStrategy(param_sync_every=k_x, state_sync_every={"exp_avg": 2 * k_x, "exp_avg_sq": 4 * k_x},
                                peer_timeout_s=None if args.peer_timeout == "none" else float(args.peer_timeout)),
        max_epochs=args.max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    ckpt = None if args.ckpt == "none" else args.ckpt
    trainer.fit(SlowNet(step_sleep=args.step_sleep, n_batches=args.n_batches), ckpt_path=ckpt)
    if args.no_checkpoints:
        return
    trainer.save_checkpoint(os.path.join(args.out, "final.ckpt"))
    if trainer.global_rank == 0:
        decision = trainer.strategy.resume_decision
        with open(os.path.join(args.out, "attempt.json"), "w") as f:
            json.dump({"restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                       "resume": None if decision is None else decision.path,
                       "resumed_from": None if decision is None else decision.resolved}, f)


if __name__ == "__main__":
    main()
