"""Adaptive periods and the drift trigger: the policy's formula re-derived here, real 2-process runs."""

import csv
import math

import pytest
import torch

from lightning_desloc import DeslocStrategy
from lightning_desloc.adaptive import AutoPeriods, choose_periods, half_life, optimizer_betas, period_cap
from lightning_desloc.comm import Comm
from helpers import N_PARAMS, START_METHOD, Regression, quiet_trainer


def policy_by_hand(step_s, round_s, beta1, beta2, budget=0.05, lo=8, hi=1024):
    k = 1
    while k < round_s / (budget * step_s):
        k *= 2
    k = min(max(k, lo), hi)
    tau = lambda b: math.log(0.5) / math.log(b)  # noqa: E731
    k_u = k * math.ceil(max(3 * k, tau(beta1)) / k)
    k_v = k * math.ceil(max(6 * k, tau(beta2)) / k)
    return k, {"exp_avg": k_u, "exp_avg_sq": k_v}


@pytest.mark.parametrize("step_s, round_s, beta1, beta2", [
    (0.1, 2.0, 0.9, 0.999), (0.01, 0.001, 0.9, 0.999), (0.02, 30.0, 0.95, 0.9999), (0.05, 0.4, 0.99, 0.9999),
])
def test_policy_matches_its_formula(step_s, round_s, beta1, beta2):
    got = choose_periods(step_s, round_s, {"exp_avg": beta1, "exp_avg_sq": beta2})
    assert got == policy_by_hand(step_s, round_s, beta1, beta2)


def cap_by_hand(total_steps, min_syncs, lo=8, hi=1024):
    """Largest power of two <= total_steps / min_syncs, clipped to [lo, hi]."""
    k = 1
    while 2 * k <= total_steps / min_syncs:
        k *= 2
    return min(max(k, lo), hi)


@pytest.mark.parametrize("total, syncs, expected", [
    (1200, 32, 32), (8192, 32, 256), (64, 32, 8), (10**7, 32, 1024), (1200, 1, 1024), (None, 32, 1024),
    (math.inf, 32, 1024),
])
def test_period_cap_leaves_the_asked_number_of_averages(total, syncs, expected):
    assert period_cap(total, syncs) == expected
    if total is not None and math.isfinite(total):
        assert expected == cap_by_hand(total, syncs)


def test_decide_caps_the_time_policy_by_the_run_length():
    auto = AutoPeriods(warmup_steps=2, comm_budget=0.05, min_param_syncs=32)
    auto.stamp(0.0), auto.stamp(0.01)  # 10 ms steps; a 80 ms round wants K_x = 256 for a 5 % budget
    assert auto.decide(0.08, {"exp_avg": 0.9, "exp_avg_sq": 0.999}, Comm())[0] == 256
    k_x, periods = auto.decide(0.08, {"exp_avg": 0.9, "exp_avg_sq": 0.999}, Comm(), total_steps=1200)
    assert (k_x, periods) == (32, {"exp_avg": 96, "exp_avg_sq": 704}) and auto.measured["max_period"] == 32
    with pytest.raises(ValueError, match="min_param_syncs"):
        AutoPeriods(min_param_syncs=0)


def test_half_lives_and_betas_from_optimizers():
    assert half_life(0.9) == pytest.approx(6.579, abs=1e-3)
    assert half_life(0.9999) == pytest.approx(6931.1, abs=0.1)
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_betas(torch.optim.Adam(p, betas=(0.8, 0.99)), ["exp_avg", "exp_avg_sq"]) == {
        "exp_avg": 0.8, "exp_avg_sq": 0.99}
    assert optimizer_betas(torch.optim.SGD(p, lr=0.1, momentum=0.7), ["momentum_buffer"]) == {"momentum_buffer": 0.7}


def test_auto_rejects_explicit_state_periods():
    with pytest.raises(ValueError, match="leave state_sync_every=None"):
        DeslocStrategy(param_sync_every="auto", state_sync_every=4)
    with pytest.raises(ValueError, match="max_drift must be a positive"):
        DeslocStrategy(max_drift=0.0)


@pytest.mark.parametrize("min_syncs", [1, 32])
def test_auto_periods_in_a_real_run_follow_the_measured_times(tmp_path, min_syncs):
    from lightning.pytorch.loggers import CSVLogger

    steps = 64
    strategy = DeslocStrategy(param_sync_every="auto", comm_budget=0.5, min_param_syncs=min_syncs,
                              start_method=START_METHOD)
    logger = CSVLogger(tmp_path, name="auto", version=0)
    quiet_trainer(strategy=strategy, max_steps=steps, limit_val_batches=0, logger=logger).fit(
        Regression(n_batches=steps))
    rows = [r for r in csv.DictReader(open(tmp_path / "auto" / "version_0" / "metrics.csv"))
            if r.get("comm/auto/param_sync_every")]
    assert len(rows) == 1
    row = rows[0]
    # the Trainer's 64 steps cap K_x: at 64 with min_param_syncs=1, at the floor 8 with 32
    cap = float(row["comm/auto/max_period"])
    assert cap == cap_by_hand(steps, min_syncs) == {1: 64, 32: 8}[min_syncs]
    k_x, periods = policy_by_hand(float(row["comm/auto/step_time_s"]), float(row["comm/auto/round_time_s"]),
                                  0.9, 0.999, budget=0.5, hi=cap)
    assert float(row["comm/auto/param_sync_every"]) == k_x
    assert float(row["comm/auto/state_sync_every/exp_avg_sq"]) == periods["exp_avg_sq"]
    # one timed average after the 16 warm-up steps, then the chosen schedule from step 17 on
    expected_params = 1 + sum(1 for s in range(17, steps + 1) if s % k_x == 0)
    assert strategy.ledger.bytes["params"] == expected_params * N_PARAMS * 4


@pytest.mark.parametrize("max_drift, early", [(1e-12, True), (1e9, False)])
def test_drift_trigger_adds_parameter_averages(max_drift, early):
    steps, check = 12, 3
    strategy = DeslocStrategy(param_sync_every=1000, max_drift=max_drift, drift_check_every=check,
                              start_method=START_METHOD)
    quiet_trainer(strategy=strategy, max_steps=steps, limit_val_batches=0).fit(Regression(n_batches=steps))
    checks = steps // check
    synced = checks if early else 0
    final = 0 if early else 1  # the end-of-fit consensus, unless the last step was already averaged
    assert strategy.ledger.bytes.get("params", 0) == (synced + final) * N_PARAMS * 4
    assert strategy.ledger.bytes["control"] >= checks * 4
