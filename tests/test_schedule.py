"""The schedule as a pure object: which tensors are due after optimizer step s."""

import pytest

from lightning_desloc.schedule import SyncPlan, SyncSchedule

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def brute_force_due(step, k_x, periods):
    """The rule of the notes, written out: params if s % K_x == 0, state k if s % K_k == 0."""
    return step % k_x == 0, tuple(sorted(k for k, p in periods.items() if step % p == 0))


@pytest.mark.parametrize("k_x", [1, 3, 4, 256])
def test_defaults_are_three_and_six_times_param_period(k_x):
    sched = SyncSchedule(param_sync_every=k_x)
    assert sched.period_of("exp_avg") == 3 * k_x
    assert sched.period_of("momentum_buffer") == 3 * k_x
    assert sched.period_of("exp_avg_sq") == 6 * k_x
    assert sched.period_of("max_exp_avg_sq") == 6 * k_x
    for step in range(1, 20 * k_x + 1, max(1, k_x // 4)):
        params, states = brute_force_due(step, k_x, {"exp_avg": 3 * k_x, "exp_avg_sq": 6 * k_x})
        assert sched.due(step, ADAM_KEYS) == SyncPlan(step, params, states)


def test_int_means_one_period_for_every_state_including_unknown_keys():
    sched = SyncSchedule(param_sync_every=4, state_sync_every=4)  # Local Adam
    assert sched.period_of("exp_avg") == sched.period_of("exp_avg_sq") == sched.period_of("my_state") == 4
    assert sched.due(8, ADAM_KEYS) == SyncPlan(8, True, ADAM_KEYS)
    assert sched.due(6, ADAM_KEYS).empty


def test_dict_overrides_only_the_keys_it_names():
    sched = SyncSchedule(param_sync_every=2, state_sync_every={"exp_avg": 5, "custom": 7})
    assert sched.period_of("exp_avg") == 5
    assert sched.period_of("exp_avg_sq") == 12
    assert sched.period_of("custom") == 7
    assert sched.due(35, ["exp_avg", "custom"]) == SyncPlan(35, False, ("custom", "exp_avg"))


def test_counts_over_1536_steps_give_paper_ratio():
    sched = SyncSchedule(param_sync_every=256)
    counts = sched.count(1536, ADAM_KEYS)
    assert counts == {"params": 6, "exp_avg": 2, "exp_avg_sq": 1}
    # model-sizes sent vs DDP's one per step: 1536 / 9 = 170.67
    assert 1536 / sum(counts.values()) == pytest.approx(256 / 1.5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True, None])
def test_bad_param_period_is_rejected_with_the_fix(bad):
    with pytest.raises(ValueError, match="param_sync_every must be a positive integer"):
        SyncSchedule(param_sync_every=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_state_period_is_rejected(bad):
    with pytest.raises(ValueError, match="state_sync_every"):
        SyncSchedule(param_sync_every=4, state_sync_every=bad)
    with pytest.raises(ValueError, match=r"state_sync_every\['exp_avg'\]"):
        SyncSchedule(param_sync_every=4, state_sync_every={"exp_avg": bad})


def test_step_counter_cannot_be_given_a_period():
    with pytest.raises(ValueError, match="never averaged"):
        SyncSchedule(param_sync_every=4, state_sync_every={"step": 4})


def test_unknown_state_keys_error_names_them_and_the_fix():
    sched = SyncSchedule(param_sync_every=4)
    sched.check_keys(["exp_avg", "exp_avg_sq", "momentum_buffer"])
    # the README's rule for keys the defaults do not list: 6 * K_x for second moments, 3 * K_x otherwise
    with pytest.raises(ValueError, match=r"\['row_var'\].*state_sync_every=\{'row_var': 24\}"):
        sched.check_keys(["exp_avg", "row_var"])
    with pytest.raises(ValueError, match=r"state_sync_every=\{'momentum': 12\}"):
        sched.check_keys(["momentum"])


def test_steps_count_from_one():
    with pytest.raises(ValueError):
        SyncSchedule(4).due(0)


def test_baseline_policies():
    keep = SyncSchedule(param_sync_every=3, state_policy="keep_local")
    reset = SyncSchedule(param_sync_every=3, state_policy="reset")
    for step in range(1, 40):
        assert keep.due(step, ADAM_KEYS) == SyncPlan(step, step % 3 == 0, ())
        assert reset.due(step, ADAM_KEYS) == SyncPlan(step, step % 3 == 0, (), reset_states=step % 3 == 0)
    keep.check_keys(["anything"])  # nothing is averaged, so no period is needed
    with pytest.raises(ValueError, match="state_sync_every must be None"):
        SyncSchedule(param_sync_every=3, state_sync_every=9, state_policy="keep_local")
    with pytest.raises(ValueError, match="state_policy must be one of"):
        SyncSchedule(param_sync_every=3, state_policy="sometimes")
