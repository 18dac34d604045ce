"""Real 2-process DES-LOC fits against the independent simulator in ``reference.py``.

Each case runs ``Trainer(devices=2, strategy=DeslocStrategy(..., start_method=START_METHOD))`` on gloo in
float64. A callback in every worker process records the parameters and the optimizer state after
every optimizer step (and at the start, after the strategy's rank-0 broadcast), and the weights each
rank ends the fit with; the pytest process compares all of it with ``reference.simulate`` for
M = 2 workers on the same per-rank data, from rank 0's perturbed initial weights.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

import reference as ref
from lightning_desloc import DeslocStrategy
from helpers import START_METHOD, Mlp, Recorder

WORLD = 2

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's num_workers and similar hints


# --------------------------------------------------------------------------- what runs in the workers
# --------------------------------------------------------------------------- the cases
ADAM_PERIODS = {"exp_avg": 4, "exp_avg_sq": 6}
SGD_PERIODS = {"momentum_buffer": 5}
CASES = {
    # name: (reference config, optimizer-step calls, DeslocStrategy's state_sync_every, manual optimization)
    "adam": (ref.Config("adam", param_sync_every=3, state_sync_every=ADAM_PERIODS, lr=2e-2), 14, ADAM_PERIODS, False),
    # state_sync_every=None must give the paper's defaults 3*K_x and 6*K_x
    "adam-l2-clip-lambdalr": (
        ref.Config("adam", param_sync_every=2, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12}, lr=3e-2,
                   weight_decay=0.05, clip_norm=1.2, lr_schedule=("lambda",)),
        13, None, False,
    ),
    # the first 4 steps as DDP (mean gradient before clipping, accumulated over 2 micro-batches), then DES-LOC
    # counting from the end of the warm-up
    "adam-ddp-warmup-accumulate-clip": (
        ref.Config("adam", param_sync_every=3, state_sync_every=ADAM_PERIODS, lr=2e-2, accumulate=2, clip_norm=1.0,
                   ddp_warmup_steps=4),
        13, ADAM_PERIODS, False,
    ),
    "adamw-accumulate-steplr": (
        ref.Config("adamw", param_sync_every=3, state_sync_every=ADAM_PERIODS, lr=2e-2, weight_decay=0.1,
                   accumulate=2, lr_schedule=("step", 4, 0.5)),
        13, ADAM_PERIODS, False,
    ),
    "sgd-momentum-accumulate-clip": (
        ref.Config("sgd", param_sync_every=3, state_sync_every=SGD_PERIODS, lr=5e-2, momentum=0.9,
                   dampening=0.1, weight_decay=0.01, accumulate=2, clip_norm=1.2),
        16, SGD_PERIODS, False,
    ),
    "manual-sgd-nesterov-clip-steplr": (
        ref.Config("sgd", param_sync_every=4, state_sync_every=SGD_PERIODS, lr=5e-2, momentum=0.8,
                   nesterov=True, clip_norm=1.5, lr_schedule=("step", 5, 0.7)),
        14, SGD_PERIODS, True,
    ),
    "manual-adam": (ref.Config("adam", param_sync_every=3, state_sync_every=ADAM_PERIODS, lr=2e-2), 13, ADAM_PERIODS, True),
    # fp16 GradScaler on CPU: autocast leaves float64 ops alone and the scale is a power of two, so the
    # gradients are exact; calls 2 and 5 get infinite gradients on rank 1 only: its scaler skips those
    # updates, rank 0's does not, and both still count the steps (else the ranks' schedules part and
    # they enter different collectives: a hang until the gloo timeout).
    "amp-skipped-steps": (
        ref.Config("adam", param_sync_every=2, state_sync_every={"exp_avg": 5, "exp_avg_sq": 3}, lr=2e-2,
                   skip_calls=frozenset({2, 5}), skip_ranks=frozenset({1})),
        13, {"exp_avg": 5, "exp_avg_sq": 3}, False,
    ),
}


def run_fit(tmp_path, cfg: ref.Config, n_calls: int, state_sync_every, manual: bool, overlap_steps: int = 0,
            overlap_local_weight: float = 1.0):
    """One real 2-process fit; returns the strategy of the main process and each rank's records."""
    kwargs = {"accumulate_grad_batches": cfg.accumulate}
    if cfg.clip_norm is not None and not manual:  # manual optimization clips in training_step
        kwargs.update(gradient_clip_val=cfg.clip_norm, gradient_clip_algorithm="norm")
    if cfg.skip_calls:
        kwargs["plugins"] = [MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]
    strategy = DeslocStrategy(param_sync_every=cfg.param_sync_every, state_sync_every=state_sync_every,
                              overlap_steps=overlap_steps, overlap_local_weight=overlap_local_weight,
                              ddp_warmup_steps=cfg.ddp_warmup_steps,
                              fragments=cfg.fragments, start_method=START_METHOD)
    model = Mlp(cfg, n_calls, manual=manual)
    model.double()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=1, limit_val_batches=0,
        use_distributed_sampler=False, enable_progress_bar=False, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[Recorder(str(tmp_path))], **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return strategy, [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_every_step_matches_the_reference(tmp_path, name):
    cfg, n_calls, state_sync_every, manual = CASES[name]
    strategy, ranks = run_fit(tmp_path, cfg, n_calls, state_sync_every, manual)
    history = ref.simulate(cfg, n_calls, workers=WORLD, init=ref.start_params(0, cfg.seed))
    n_steps = ref.optimizer_steps(cfg, n_calls)

    # the ranks really started apart, and the broadcast left both on rank 0's perturbed weights
    torch.testing.assert_close(ranks[0]["perturbed"], ref.start_params(0, cfg.seed), rtol=0, atol=0)
    torch.testing.assert_close(ranks[1]["perturbed"], ref.start_params(1, cfg.seed), rtol=0, atol=0)
    assert not torch.equal(ranks[0]["perturbed"][0], ranks[1]["perturbed"][0])

    for r in range(WORLD):
        assert ranks[r]["optimizer_steps"] == [n_steps]
        assert len(ranks[r]["history"]) == n_calls + 1, f"rank {r}: one record per optimizer step expected"
        for call, (got, want) in enumerate(zip(ranks[r]["history"], history)):
            assert got["global_step"] == call
            ref.assert_snapshot_matches(got, want[r], f"{name}: rank {r} after optimizer-step call {call}")
    assert strategy.optimizer_steps == [n_steps]  # rank 0's counters reach the main process

    # not vacuous: rank-dependent data drives the ranks apart between averages (and not in a DDP warm-up)
    first_local = cfg.ddp_warmup_steps + 1
    assert not torch.allclose(ranks[0]["history"][first_local]["params"][0], ranks[1]["history"][first_local]["params"][0])
    for call in range(1, first_local):
        assert torch.equal(ranks[0]["history"][call]["params"][0], ranks[1]["history"][call]["params"][0])

    # after fit every rank holds the consensus: the mean of the last local parameters
    expected_final = ref.consensus(history[-1])
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["final"], expected_final, **ref.SNAPSHOT_TOL)
    local_steps = n_steps - cfg.ddp_warmup_steps  # DES-LOC's schedule counts from the end of the warm-up
    last_was_sync = local_steps % cfg.param_sync_every == 0
    if not last_was_sync:
        assert not torch.allclose(ranks[0]["history"][-1]["params"][0], expected_final[0])

    # the bytes of the schedule, plus one closing parameter average when the last step was not a sync step,
    # plus the warm-up's gradients (one model size per step)
    model_bytes = ref.N_PARAMS * 8
    assert strategy.ledger.bytes["params"] == (local_steps // cfg.param_sync_every + (not last_was_sync)) * model_bytes
    for key in cfg.state_keys():
        assert strategy.ledger.bytes.get(f"state/{key}", 0) == local_steps // cfg.state_sync_every[key] * model_bytes
    assert strategy.ledger.bytes.get("grads", 0) == cfg.ddp_warmup_steps * model_bytes
    assert strategy.ledger.bytes["setup"] == model_bytes


def test_reference_averages_on_the_documented_steps():
    """The simulator itself: workers agree exactly on the steps where something is averaged, and only there."""
    cfg, n_calls = CASES["adam"][0], CASES["adam"][1]
    history = ref.simulate(cfg, n_calls)
    for s in range(1, n_calls + 1):
        a, b = history[s]
        assert a["step"] == b["step"] == s
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])) == (s % 3 == 0), s
        for key, period in ADAM_PERIODS.items():
            same = all(torch.equal(p, q) for p, q in zip(a["state"][key], b["state"][key]))
            assert same == (s % period == 0), (s, key)


@pytest.mark.parametrize("lam", [1.0, 0.25])
def test_overlapped_fit_matches_the_delayed_reference(tmp_path, lam):
    # overlap_steps=2: every average lands two optimizer steps after the step that made it due, each rank
    # keeping its progress since (lam = 0.25: a quarter of it, the rest the mean's extrapolated progress;
    # rules re-derived in reference.simulate_overlapped)
    cfg = ref.Config("adam", param_sync_every=3, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6}, lr=2e-2,
                     accumulate=2)
    n_calls, tau = 14, 2
    strategy, ranks = run_fit(tmp_path, cfg, n_calls, cfg.state_sync_every, False, overlap_steps=tau,
                              overlap_local_weight=lam)
    history = ref.simulate_overlapped(cfg, n_calls, tau, workers=WORLD, init=ref.start_params(0, cfg.seed),
                                      local_weight=lam)
    for r in range(WORLD):
        for call, (got, want) in enumerate(zip(ranks[r]["history"], history)):
            ref.assert_snapshot_matches(got, want[r], f"overlap: rank {r} after optimizer-step call {call}")
    # nothing is in flight after step 14 (the last rounds, of steps 12, land at 14): after fit every rank
    # holds the mean of the last local parameters
    expected_final = ref.consensus(history[-1])
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["final"], expected_final, **ref.SNAPSHOT_TOL)
    # rounds after steps 3, 6, 9, 12 plus the closing average (the ranks differ after every landing)
    model_bytes = ref.N_PARAMS * 8
    assert strategy.ledger.bytes["params"] == (n_calls // 3 + 1) * model_bytes
    assert strategy.ledger.bytes["state/exp_avg"] == (n_calls // 4) * model_bytes


def test_fragments_with_overlap_fit_matches_the_reference(tmp_path):
    # two fragments ([W1] and [b1, W2, b2]) at offsets 0 and 2 of K_x = 4, each round landing one step later
    cfg = ref.Config("adam", param_sync_every=4, state_sync_every={"exp_avg": 8, "exp_avg_sq": 12}, lr=2e-2,
                     fragments=2)
    n_calls, tau = 13, 1
    strategy, ranks = run_fit(tmp_path, cfg, n_calls, cfg.state_sync_every, False, overlap_steps=tau)
    history = ref.simulate_overlapped(cfg, n_calls, tau, workers=WORLD, init=ref.start_params(0, cfg.seed))
    for r in range(WORLD):
        for call, (got, want) in enumerate(zip(ranks[r]["history"], history)):
            ref.assert_snapshot_matches(got, want[r], f"fragments: rank {r} after optimizer-step call {call}")
    expected_final = ref.consensus(history[-1])
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["final"], expected_final, **ref.SNAPSHOT_TOL)
    # by hand: fragment 0 (35 float64) after s = 4, 8, 12, fragment 1 (31) after s = 2, 6, 10, plus the
    # whole-model closing average; the largest round is fragment 1's at s = 2 (its params and both states,
    # 744 bytes, and the 4-byte signals), larger than the whole-model parameter rounds (the setup broadcast,
    # the closing average: 528)
    f0, f1 = 35 * 8, 31 * 8
    assert strategy.ledger.bytes["params"] == 3 * f0 + 3 * f1 + (f0 + f1)
    assert strategy.ledger.largest_round_bytes == 3 * f1 + 4 * (1 + 2)  # and the signal and 2 flags
