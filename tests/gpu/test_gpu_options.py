"""DES-LOC's options on two ranks sharing one GPU under ``cuda:gloo``: the drift trigger, ``"auto"``,
compression, the outer step, overlapped rounds and bf16-true parameters. Each test counts what the option
should have sent and recomputes what it should have done from the ranks' recorded local parameters."""

import math

import torch

from gpu_harness import (
    N_PARAMS,
    SHARED_DEVICE,
    assert_schedule_rounds,
    assert_trained_on,
    launch,
    mean_over_ranks,
    model_bytes,
)

P4 = model_bytes(4)


def scheduled_bytes(result):
    return {k: v for k, v in result["ledger_bytes"].items() if k == "params" or k.startswith("state/")}


def test_drift_trigger_averages_early(tmp_path):
    ranks = launch("drift", tmp_path)
    assert_trained_on(ranks, [SHARED_DEVICE] * 2)
    # K_x=64 never comes in 8 steps; checked every 2 steps, any drift exceeds 1e-9: 4 early averages
    for result in ranks:
        assert result["early_syncs"] == 4
        assert scheduled_bytes(result) == {"params": 4 * P4}
        assert result["ledger_bytes"]["control"] >= 4 * 4  # at least the 4 float32 maxima of the checks
    assert_schedule_rounds(ranks, steps=8, round_steps={2, 4, 6, 8})


def test_auto_periods_are_chosen_and_followed(tmp_path):
    ranks = launch("auto", tmp_path)
    assert_trained_on(ranks, [SHARED_DEVICE] * 2)
    # A 24-step run must keep min_param_syncs=32 averages: the cap 2**floor(log2(24/32)) is below the
    # policy's shortest period, 8, so K_x = 8 whatever was timed. exp_avg: the multiple of 8 reaching
    # max(3 * 8, half-life of beta1=0.9 (6.6)) = 24; exp_avg_sq: max(6 * 8, half-life of 0.999 (692.8)) -> 696.
    half_life_beta2 = math.log(0.5) / math.log(0.999)
    expected_sq = 8 * math.ceil(max(48, half_life_beta2) / 8)
    assert expected_sq == 696
    for result in ranks:
        assert result["schedule"]["param_sync_every"] == 8
        assert result["schedule"]["state_sync_every"]["exp_avg"] == 24
        assert result["schedule"]["state_sync_every"]["exp_avg_sq"] == expected_sq
        # the timed warm-up average after step 16, then step 24 (params, and exp_avg's period)
        assert scheduled_bytes(result) == {"params": 2 * P4, "state/exp_avg": P4}
        assert result["ledger_bytes"]["control"] >= 2 * 8  # the decision's all-reduced (step, round) times
    assert_schedule_rounds(ranks, steps=24, round_steps={16, 24})


def test_compression_bf16_params_int8_states(tmp_path):
    ranks = launch("compression", tmp_path)
    assert_trained_on(ranks, [SHARED_DEVICE] * 2)
    int8_bytes = N_PARAMS + 4 * math.ceil(N_PARAMS / 256)  # one int8 per element, one float32 scale per 256
    for result in ranks:
        assert scheduled_bytes(result) == {"params": 4 * 2 * N_PARAMS, "state/exp_avg": 2 * int8_bytes,
                                           "state/exp_avg_sq": 1 * int8_bytes}
    # The bounds allow each rank's value to be rounded once by the codec and the mean once more (the
    # coded round may re-encode the mean it hands back); every rank applies the same bytes.
    for s in (2, 4, 6, 8):
        local = [r["pre"][s]["params"] for r in ranks]
        mean = mean_over_ranks(local)
        assert torch.equal(ranks[0]["post"][s], ranks[1]["post"][s]), s
        # bfloat16 keeps 8 significant bits: each rounding is off by at most 2^-8 of the value
        bound = 2.0 ** -7 * torch.maximum(local[0].abs(), local[1].abs()) * 1.01
        assert ((ranks[0]["post"][s] - mean).abs() <= bound).all(), s
        for own in local:  # and the round did move every rank to (near) the mean
            assert (ranks[0]["post"][s] - mean).norm() < (own - mean).norm(), s
    # step 8 averaged both moments (int8): the ranks agree, within the coding's rounding of the true mean
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ranks[0][f"final_{key}"], ranks[1][f"final_{key}"])
    # q = round(x / s), s = max|x| / 127 per chunk of 256 (here one chunk): off by at most s / 2 = max|x| / 254
    m = [r["pre"][8]["exp_avg"] for r in ranks]
    peaks = [x.abs().max() for x in m]
    bound = (sum(peaks) / len(peaks) + max(peaks)) / 254 * 1.01
    assert ((ranks[0]["final_exp_avg"] - mean_over_ranks(m)).abs() <= bound).all()
    # second moments are coded by their square root: sqrt(v) off by e = max sqrt(v) / 254, so v by 2 sqrt(v) e + e^2
    v = [r["pre"][8]["exp_avg_sq"] for r in ranks]
    first = mean_over_ranks([2 * x.sqrt() * (x.sqrt().max() / 254) + (x.sqrt().max() / 254) ** 2 for x in v])
    coded_mean = mean_over_ranks(v) + first  # the largest the mean of the decoded values can be
    e_mean = coded_mean.sqrt().max() / 254
    bound_sq = (first + 2 * coded_mean.sqrt() * e_mean + e_mean ** 2) * 1.01
    assert ((ranks[0]["final_exp_avg_sq"] - mean_over_ranks(v)).abs() <= bound_sq).all()
    assert (ranks[0]["final_exp_avg_sq"] > 0).all()  # int8 second moments never decode to zero


def test_outer_step_is_nesterov_sgd_on_the_pseudo_gradient(tmp_path):
    ranks = launch("outer", tmp_path)
    assert_trained_on(ranks, [SHARED_DEVICE] * 2)
    lr, mu = 0.7, 0.9
    x_g = ranks[0]["initial"].double()  # the consensus after setup's broadcast
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    buf = None
    for s in (2, 4, 6):
        g = x_g - mean_over_ranks([r["pre"][s]["params"].double() for r in ranks])
        buf = g.clone() if buf is None else mu * buf + g
        x_g = x_g - lr * (g + mu * buf)
        for result in ranks:
            torch.testing.assert_close(result["post"][s].double(), x_g, rtol=1e-5, atol=1e-6)
        assert torch.equal(ranks[0]["post"][s], ranks[1]["post"][s])
    for result in ranks:  # exp_avg on its default period, 3 * K_x = 6
        assert scheduled_bytes(result) == {"params": 3 * P4, "state/exp_avg": P4}


def test_overlapped_rounds_land_one_step_later_keeping_local_progress(tmp_path):
    ranks = launch("overlap", tmp_path)
    assert_trained_on(ranks, [SHARED_DEVICE] * 2)
    for s in (4, 8):  # issued after step s, applied after step s + 1
        mean = mean_over_ranks([r["pre"][s]["params"] for r in ranks])
        for result in ranks:
            assert torch.equal(result["post"][s], result["pre"][s]["params"])  # still in flight
            expected = mean + (result["pre"][s + 1]["params"] - result["pre"][s]["params"])
            torch.testing.assert_close(result["post"][s + 1], expected, rtol=1e-6, atol=1e-6)
    for result in ranks:
        # two scheduled parameter rounds plus the end of training's (step 10 is not a sync step);
        # both moments once, after step 8
        assert scheduled_bytes(result) == {"params": 3 * P4, "state/exp_avg": P4, "state/exp_avg_sq": P4}
        assert torch.equal(result["final"], mean_over_ranks([r["post"][10] for r in ranks]))


def test_overlap_local_weight_mixes_in_the_consensus_progress_on_the_device(tmp_path):
    # the last mean lives on the device (a CPU copy would fail under the CUDA-only group); the rule by hand:
    # x <- mean(x_s) + lam (x_{s+1} - x_s) + (1 - lam) (tau / K_x) (mean(x_s) - mean(x_{s-K_x}))
    ranks = launch("overlap_lam", tmp_path)
    assert_trained_on(ranks, [SHARED_DEVICE] * 2)
    mean4 = mean_over_ranks([r["pre"][4]["params"] for r in ranks])
    mean8 = mean_over_ranks([r["pre"][8]["params"] for r in ranks])
    for result in ranks:
        first = mean4 + (result["pre"][5]["params"] - result["pre"][4]["params"])  # lam = 1 on the first round
        torch.testing.assert_close(result["post"][5], first, rtol=1e-6, atol=1e-6)
        mixed = mean8 + 0.5 * (result["pre"][9]["params"] - result["pre"][8]["params"]) + 0.5 * 0.25 * (mean8 - mean4)
        torch.testing.assert_close(result["post"][9], mixed, rtol=1e-6, atol=1e-6)
    for result in ranks:  # no extra bytes for the mix
        assert scheduled_bytes(result) == {"params": 3 * P4, "state/exp_avg": P4, "state/exp_avg_sq": P4}


def test_bf16_true_parameters_are_averaged_in_bf16(tmp_path):
    ranks = launch("bf16", tmp_path)
    assert_trained_on(ranks, [SHARED_DEVICE] * 2)
    for result in ranks:
        assert result["param_dtypes"] == ["torch.bfloat16"] and result["state_dtypes"] == ["torch.bfloat16"]
        two = 2 * N_PARAMS  # 2 bytes per bf16 element
        assert scheduled_bytes(result) == {"params": 2 * two, "state/exp_avg": two, "state/exp_avg_sq": two}
    # the bf16 sum of the two ranks (rounded once), halved
    assert_schedule_rounds(ranks, steps=4, round_steps={2, 4})
