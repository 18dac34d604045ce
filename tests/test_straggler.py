"""A straggler (issue 15): one rank much slower than the other at some steps changes nothing.

Two 2-rank fits of the same float64 model (dropout, so the RNG matters too), K_x = 3, ``exp_avg`` every
6 and ``exp_avg_sq`` every 12 steps, one with sleeps: rank 1 sleeps before the backward pass of the
steps right before a round (3 and 6: the other rank is already waiting in the round) and rank 0 after
step 4 (a local step). Every rank's parameters after every step and its parameters and both Adam states
at the end are equal bit for bit to the fit without sleeps, and the liveness watch
(``peer_timeout_s=5``) does not fire for a peer that is only late by less than that.
"""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ckpt_models import Net, Recorder
from helpers import START_METHOD
from lightning_desloc import DeslocStrategy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PERIODS = dict(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12})
#: (rank, optimizer step whose batch it delays, hook) -> seconds
SLEEPS = {(1, 3, "before_backward"): 0.8, (1, 6, "before_backward"): 0.8, (0, 4, "batch_end"): 0.6}


class Straggle(Callback):
    """Sleeps on the ranks and steps of :data:`SLEEPS`; records how long each rank slept."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _sleep(self, trainer, step: int, hook: str) -> None:
        seconds = SLEEPS.get((trainer.global_rank, step, hook))
        if seconds:
            time.sleep(seconds)

    def on_before_backward(self, trainer, pl_module, loss):
        self._sleep(trainer, trainer.global_step + 1, "before_backward")  # the step this backward leads to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sleep(trainer, trainer.global_step, "batch_end")


def fit(out, straggle: bool) -> dict[int, dict]:
    L.seed_everything(0)
    callbacks = [Recorder(str(out)), *([Straggle(str(out))] if straggle else [])]
    trainer = L.Trainer(accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, callbacks=callbacks,
                        strategy=DeslocStrategy(**PERIODS, peer_timeout_s=5.0, start_method=START_METHOD))
    trainer.fit(Net(n_batches=4))
    return {r: torch.load(out / f"rank{r}.pt") for r in range(2)}


@pytest.mark.timeout(180)
def test_a_straggler_gives_the_same_result_bit_for_bit(tmp_path):
    plain = fit(tmp_path / "plain", straggle=False)
    start = time.monotonic()
    slow = fit(tmp_path / "slow", straggle=True)
    print(f"\nMEASURED straggler: the fit with {sum(SLEEPS.values()):.1f} s of sleeps took {time.monotonic() - start:.1f} s")
    for r in range(2):
        a, b = plain[r], slow[r]
        assert sorted(a["steps"]) == sorted(b["steps"]) == list(range(1, 9))
        for step in a["steps"]:
            assert torch.equal(a["steps"][step], b["steps"][step]), f"rank {r}, parameters after step {step}"
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["end"][key], b["end"][key]), f"rank {r}, {key} at the end"
        assert a["end"]["optimizer_steps"] == b["end"]["optimizer_steps"] == [8]
        assert a["ledger"] == b["ledger"]
    # the run is DES-LOC, not DDP: between rounds the ranks differ (so equality above is not trivial)
    assert not torch.equal(plain[0]["steps"][4], plain[1]["steps"][4])
