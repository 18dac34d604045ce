"""A DES-LOC fit meant to run under torchrun with restarts (used by tests/test_checkpoint_elastic.py).

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python -m torch.distributed.run --standalone --nproc-per-node=2 \
        --max-restarts=2 tests/elastic_worker.py --out OUT [--kill-at-step 12] [--ckpt last]

Every attempt calls ``trainer.fit(model, ckpt_path=--ckpt)``; with ``last`` (the default) a restarted group
resumes from the newest ``last.ckpt`` with no user action. ``--kill-at-step N`` makes rank 1 of the first
attempt (``TORCHELASTIC_RESTART_COUNT=0``) kill itself with SIGKILL before optimizer step N + 1. At the end
every rank calls ``trainer.save_checkpoint(OUT/final.ckpt)``: the consensus of the finished run, and
``OUT/attempt.json`` records the restart count and how the last attempt resumed. Every rank of every
attempt appends ``attempt=<restart count> rank=<rank>`` to ``OUT/attempts.txt`` when it starts, and the
rank that kills itself first writes ``OUT/killed.txt`` (the step), so that a test can tell what happened.

Keep ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment: with the store that torchrun
shares with the workers by default, a restarted gloo group can read the previous attempt's addresses
from it and fail to connect (pytorch/pytorch#135712); with it set each attempt gets a fresh store.
"""

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from ckpt_models import Net, Recorder  # noqa: E402
from lightning_desloc import DeslocStrategy  # noqa: E402


class KillOnce(Callback):
    def __init__(self, step: int, out: str):
        self.step, self.out = step, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.global_rank == 1 and trainer.global_step == self.step:
            with open(os.path.join(self.out, "killed.txt"), "w") as f:
                f.write(str(self.step))
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default="last")
    parser.add_argument("--kill-at-step", type=int, default=-1)
    parser.add_argument("--max-epochs", type=int, default=4)
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attempts.txt"), "a") as f:
        f.write(f"attempt={os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} rank={os.environ.get('RANK', '0')}\n")
    L.seed_everything(0)
    callbacks = [
        ModelCheckpoint(dirpath=os.path.join(args.out, "ckpts"), every_n_epochs=1, save_top_k=-1, save_last="link"),
        Recorder(os.path.join(args.out, "rec")),
        KillOnce(args.kill_at_step, args.out),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "2")),
        num_nodes=int(os.environ.get("WORLD_SIZE", "2")) // int(os.environ.get("LOCAL_WORLD_SIZE", "2")),
        strategy=DeslocStrategy(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12}),
        max_epochs=args.max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    ckpt = None if args.ckpt == "none" else args.ckpt
    trainer.fit(Net(), ckpt_path=ckpt)
    trainer.save_checkpoint(os.path.join(args.out, "final.ckpt"))
    if trainer.global_rank == 0:
        decision = trainer.strategy.resume_decision
        with open(os.path.join(args.out, "attempt.json"), "w") as f:
            json.dump(
                {
                    "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                    "resume": None if decision is None else decision.path,
                    "resumed_from": None if decision is None else decision.resolved,
                },
                f,
            )


if __name__ == "__main__":
    main()
