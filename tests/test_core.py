"""The core (``DeslocSync``) alone, in one process: ranks are threads joined by a fake Comm.

Each test compares with something the core did not produce: the reference simulator
(``reference.py``, written from the equations), byte counts worked out by hand, or an uninterrupted
run. Real-process tests of the same behaviour through Lightning live in test_equivalence.py,
test_groups_periods.py, test_strategy.py and the checkpoint tests.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import reference as ref
from fake_comm import run_on_threads
from lightning_desloc.config import DeslocConfig
from lightning_desloc.options import SyncOption
from lightning_desloc.schedule import SyncPlan
from lightning_desloc.sync import DeslocSync

_init = threading.Lock()  # torch's global RNG is shared by the threads


def make_worker(cfg: ref.Config):
    net = torch.nn.Sequential(torch.nn.Linear(ref.IN, ref.HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(ref.HIDDEN, ref.OUT)).double()
    with torch.no_grad():
        for p, value in zip(net.parameters(), ref.start_params(0, cfg.seed)):
            p.copy_(value)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return net, opt


def snapshot(net, opt, keys) -> dict:
    params = list(net.parameters())
    state = {k: [opt.state[p][k].clone() for p in params] for k in keys if params[0] in opt.state}
    step = int(opt.state[params[0]]["step"]) if params[0] in opt.state and "step" in opt.state[params[0]] else 0
    return {"params": [p.detach().clone() for p in params], "state": state, "step": step}


def local_step(core, net, opt, rank: int, call: int, seed: int = 0, skip: bool = False):
    """One optimizer step on the reference's batch ``call`` of ``rank``, then the core; ``skip``: the step is
    not taken (what a GradScaler does with inf gradients). Returns what ``after_step`` returned."""
    x, y = ref.make_batch(rank, call, seed)
    torch.nn.functional.mse_loss(net(x), y).backward()
    i = core.begin_step(opt)
    if core.in_warmup(opt):  # what the adapters do after the backward pass during ddp_warmup_steps
        core.average_gradients(opt)
    if not skip:
        opt.step()
    plan = core.after_step(i, opt)
    opt.zero_grad()
    return plan


def train(rank: int, world: int, comm, cfg: ref.Config, n_calls: int, config: DeslocConfig, group_first=False):
    """One thread-rank: the reference's batches, the core after every step; a snapshot after each call.
    A call ``cfg.skips`` for this rank is not stepped (what a GradScaler does with inf gradients)."""
    with _init:
        net, opt = make_worker(cfg)
    core = DeslocSync(config, comm=comm)
    if group_first:
        core.setup_groups()
    core.attach([opt])
    history = [snapshot(net, opt, cfg.state_keys())]
    plans = []
    for call in range(n_calls):
        # in the DDP warm-up the averaged gradient is infinite on every rank when it is on one: all scalers skip
        everyone = call < cfg.ddp_warmup_steps and any(cfg.skips(call, r) for r in range(world))
        plans.append(local_step(core, net, opt, rank, call, cfg.seed, skip=cfg.skips(call, rank) or everyone))
        history.append(snapshot(net, opt, cfg.state_keys()))
    return {"history": history, "plans": plans, "core": core}


ADAM = ref.Config("adam", param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6}, lr=0.05,
                  skip_calls=frozenset({3}))


def test_three_ranks_match_the_reference_after_every_step():
    n_calls = 13
    config = DeslocConfig(param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6})
    out = run_on_threads(train, 3, ADAM, n_calls, config)
    want = ref.simulate(ADAM, n_calls, workers=3)
    for call in range(n_calls + 1):
        for rank in range(3):
            ref.assert_snapshot_matches(out[rank]["history"][call], want[call][rank], f"call {call}, rank {rank}")
    # the ledger by hand: float64, 13 steps (call 3's update skipped on every rank, still step 4): params
    # after 2, 4, ..., 12; exp_avg after 4, 8, 12; exp_avg_sq after 6, 12; one round per step with anything due
    n = ref.N_PARAMS * 8
    ledger = out[0]["core"].ledger
    # and each round carries the core's signals: one float32
    assert dict(ledger.bytes) == {"params": 6 * n, "state/exp_avg": 3 * n, "state/exp_avg_sq": 2 * n,
                                  "control": 6 * (1 + 3) * 4}  # the signal and on_nonfinite's flag per rank
    assert ledger.rounds == 6 and ledger.ddp_equivalent_bytes == 13 * n
    assert out[0]["core"].skipped_steps == [1] and out[0]["core"].optimizer_steps == [13]
    # what after_step returned: the plan of the round, None for a local step
    assert out[0]["plans"][3] == SyncPlan(4, params=True, states=("exp_avg",)) and out[0]["plans"][4] is None


def test_a_scaler_skip_on_one_rank_keeps_every_rank_on_the_schedule():
    # rank 2's updates of calls 1 and 4 are skipped (its GradScaler found inf); ranks 0 and 1 step. Counting
    # only the updates that happened would put rank 2 one step behind, into other rounds than its peers
    cfg = ref.Config("adam", param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6}, lr=0.05,
                     skip_calls=frozenset({1, 4}), skip_ranks=frozenset({2}))
    config = DeslocConfig(param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6})
    out = run_on_threads(train, 3, cfg, 9, config)
    want = ref.simulate(cfg, 9, workers=3)
    for call in range(10):
        for rank in range(3):
            ref.assert_snapshot_matches(out[rank]["history"][call], want[call][rank], f"call {call}, rank {rank}")
    assert [out[r]["core"].skipped_steps for r in range(3)] == [[0], [0], [2]]
    assert want[9][2]["step"] == 7 and want[9][0]["step"] == 9  # Adam's own counter t stays the rank's


def test_ddp_warmup_then_the_schedule_from_its_end_match_the_reference():
    # 3 DDP steps (mean gradient), then DES-LOC counting s' = s - 3: params after s' = 2, 4, 6, 8 (s = 5, ..., 11),
    # exp_avg after s' = 4, 8, exp_avg_sq after s' = 6; a skip at call 1 on rank 0 is a skip on every rank
    # (the averaged gradient is infinite everywhere), as under DDP
    cfg = ref.Config("adam", param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6}, lr=0.05,
                     ddp_warmup_steps=3, skip_calls=frozenset({1}), skip_ranks=frozenset({0}))
    config = DeslocConfig(param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6}, ddp_warmup_steps=3)
    out = run_on_threads(train, 3, cfg, 11, config)
    want = ref.simulate(cfg, 11, workers=3)
    for call in range(12):
        for rank in range(3):
            ref.assert_snapshot_matches(out[rank]["history"][call], want[call][rank], f"call {call}, rank {rank}")
    assert [out[r]["core"].skipped_steps for r in range(3)] == [[1], [1], [1]]
    n = ref.N_PARAMS * 8  # float64
    ledger = out[0]["core"].ledger
    assert dict(ledger.bytes) == {"grads": 3 * n, "params": 4 * n, "state/exp_avg": 2 * n, "state/exp_avg_sq": n,
                                  "control": 3 * 4 + 4 * (1 + 3) * 4}  # warm-up rounds: the signal only
    assert ledger.ddp_equivalent_bytes == 11 * n
    assert [p.step if p else None for p in out[0]["plans"]] == [None, None, None, None, 2, None, 4, None, 6, None, 8]


def test_two_levels_match_the_two_level_reference():
    sgd = ref.Config("sgd", param_sync_every=3, state_sync_every={"momentum_buffer": 6}, lr=0.05, nesterov=True)
    n_calls = 12
    config = DeslocConfig.from_arguments(param_sync_every=3, state_sync_every={"momentum_buffer": 6}, group_size=2,
                                         group_param_sync_every=2, group_state_sync_every={"momentum_buffer": 4})
    out = run_on_threads(train, 4, sgd, n_calls, config, True)
    want = ref.simulate_two_level(sgd, n_calls, 2, 2, {"momentum_buffer": 4}, workers=4)
    for call in range(n_calls + 1):
        for rank in range(4):
            ref.assert_snapshot_matches(out[rank]["history"][call], want[call][rank], f"call {call}, rank {rank}")
    core = out[0]["core"]
    n = ref.N_PARAMS * 8
    # inner rounds carry the inner level's due and everything the outer level has due:
    # params after 2, 3, 4, 6, 8, 9, 10, 12; momentum after 4, 6, 8, 12
    assert dict(core.group_level.ledger.bytes) == {"params": 8 * n, "state/momentum_buffer": 4 * n, "control": 4 * (1 + 2) * 4}
    # outer: params after 3, 6, 9, 12; momentum after 6, 12
    assert dict(core.ledger.bytes) == {"params": 4 * n, "state/momentum_buffer": 2 * n,
                                       "control": 4 * (1 + 2) * 4}  # the signal and one flag per group


class Recording(SyncOption):
    """An option that records when the core calls it and asks for an extra average at step 5."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def adjust(self, step, plan, optimizer):
        self.calls.append(("adjust", step))
        return SyncPlan(step, True, plan.states) if step == 5 else plan

    def after_round(self, rnd):
        self.calls.append(("after_round", rnd.step))
        return {"recording/step": float(rnd.step)}


def _with_recording(rank, world, comm):
    with _init:
        net, opt = make_worker(ADAM)
    logged = []
    core = DeslocSync(DeslocConfig(param_sync_every=4, state_sync_every=100), comm=comm, log=logged.append)
    option = Recording()
    core.options.append(option)
    core.attach([opt])
    for call in range(8):
        local_step(core, net, opt, rank, call)
    return option.calls, logged, [p.detach().clone() for p in net.parameters()], core


def test_an_option_is_called_at_the_fixed_points_of_the_step():
    (calls, logged, p0, core), (_, _, p1, _) = run_on_threads(_with_recording, 2)
    # adjust before every step's rounds, after_round only after a round of the outermost level
    assert calls == [("adjust", 1), ("adjust", 2), ("adjust", 3), ("adjust", 4), ("after_round", 4),
                     ("adjust", 5), ("after_round", 5), ("adjust", 6), ("adjust", 7), ("adjust", 8),
                     ("after_round", 8)]
    assert [m["recording/step"] for m in logged] == [4.0, 5.0, 8.0]
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))  # step 8 averaged the parameters
    assert core.ledger.rounds_by_category["params"] == 3


def _save_and_rebuild(core, net, opt, config, comm):
    """Save the core, the model and the optimizer, then build all three afresh from the save."""
    saved = copy.deepcopy({"core": core.state_dict(), "model": net.state_dict(), "opt": opt.state_dict()})
    with _init:
        net, opt = make_worker(ADAM)
    net.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    core = DeslocSync(config, comm=comm)
    core.attach([opt])
    core.load_state_dict(saved["core"])
    return core, net, opt


def _resumable(rank, world, comm, stop_at, state):
    """Train 10 steps with the outer step, int8 parameters and the drift trigger; at ``stop_at`` save the
    core, the model and the optimizer, then rebuild everything from the save and go on."""
    config = DeslocConfig.from_arguments(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 6},
                                         outer_lr=0.7, compression={"params": "int8"}, max_drift=1e-3,
                                         drift_check_every=2)
    with _init:
        net, opt = make_worker(ADAM)
    core = DeslocSync(config, comm=comm)
    core.attach([opt])
    for call in range(10):
        if call == stop_at:
            core, net, opt = _save_and_rebuild(core, net, opt, config, comm)
        local_step(core, net, opt, rank, call)
    return [p.detach().clone() for p in net.parameters()], core.state_dict()


@pytest.mark.parametrize("stop_at", [4, 7])
def test_core_state_dict_resumes_bit_for_bit(stop_at):
    straight = run_on_threads(_resumable, 2, None, None)
    resumed = run_on_threads(_resumable, 2, stop_at, None)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(straight[rank][0], resumed[rank][0])), rank
        a, b = straight[rank][1], resumed[rank][1]
        assert torch.equal(a["shared"]["snapshot"]["flat"], b["shared"]["snapshot"]["flat"])
        assert torch.equal(a["shared"]["options"]["outer"]["momentum_buffer"],
                           b["shared"]["options"]["outer"]["momentum_buffer"])
        assert a["shared"]["options"]["drift"] == b["shared"]["options"]["drift"]
    # the test is not vacuous: the drift trigger added averages, and the ranks differ between averages
    assert straight[0][1]["shared"]["options"]["drift"]["early_syncs"] > 0


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive size in MiB"):
        DeslocConfig(bucket_cap_mb=0)
    with pytest.raises(ValueError, match="outer_momentum must be in"):
        DeslocConfig.from_arguments(outer_lr=0.5, outer_momentum=1.0)
    with pytest.raises(ValueError, match="group_param_sync_every and group_state_sync_every set the periods"):
        DeslocConfig.from_arguments(group_param_sync_every=4)
    with pytest.raises(ValueError, match="validate_on must be 'consensus' or 'local'"):
        DeslocConfig(validate_on="mean")
    with pytest.raises(TypeError):
        DeslocConfig(64)  # keyword-only: a positional period cannot land in the wrong field


def test_options_of_a_feature_that_is_off_warn():
    with pytest.warns(UserWarning, match="outer_momentum only take.* effect with outer_lr"):
        DeslocConfig.from_arguments(outer_momentum=0.5)
    with pytest.warns(UserWarning, match="comm_budget, min_param_syncs only take.* param_sync_every='auto'"):
        DeslocConfig.from_arguments(param_sync_every=16, comm_budget=0.2, min_param_syncs=4)
    with pytest.warns(UserWarning, match="drift_check_every only take.* max_drift"):
        DeslocConfig.from_arguments(drift_check_every=4)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults, or the feature on, say nothing
        DeslocConfig.from_arguments(outer_momentum=0.9, comm_budget=0.05, drift_check_every=16)
        DeslocConfig.from_arguments(outer_lr=0.7, outer_momentum=0.5, max_drift=0.1, drift_check_every=4)
        DeslocConfig.from_arguments(param_sync_every="auto", comm_budget=0.2)


@pytest.mark.parametrize("argument", [dict(state_sync_every={"exp_avgg": 10}), dict(compression={"exp_avg_sqq": "bf16"})])
def test_a_state_key_no_optimizer_keeps_is_an_error_at_the_first_step(argument):
    net, opt = make_worker(ref.Config("adam", 4, {"exp_avg": 8, "exp_avg_sq": 16}))
    core = DeslocSync(DeslocConfig(param_sync_every=4, **argument))
    core.attach([opt])
    name, value = next(iter(argument.items()))
    with pytest.raises(ValueError, match=rf"{name} names state key\(s\) \['{next(iter(value))}'\] that no optimizer keeps; "
                                         r"the optimizers' averaged state keys are \['exp_avg', 'exp_avg_sq'\]"):
        local_step(core, net, opt, rank=0, call=0)


def _stop_signal(rank, world, comm, config, raise_on, raise_at_call, n_calls):
    with _init:
        net, opt = make_worker(ref.Config("sgd", 3, {"momentum_buffer": 6}, lr=0.05))
    core = DeslocSync(config, comm=comm)
    core.setup_groups()
    core.attach([opt])
    agreed = []
    for call in range(n_calls):
        if rank == raise_on and call == raise_at_call:
            core.raise_signal("stop")
        local_step(core, net, opt, rank, call)
        agreed.append("stop" in core.agreed)
    return agreed


@pytest.mark.parametrize("group_param_sync_every", [None, 1, 2])
def test_a_signal_raised_on_one_rank_reaches_every_rank_at_the_same_step(group_param_sync_every):
    # rank 3 raises during step 4 (call 3); K_x = 3: it rides on the round after step 6 and every rank reads
    # it one step later, at step 7 -- also across hierarchical groups (rank 0 shares neither group nor position)
    groups = {} if group_param_sync_every is None else dict(group_size=2, group_param_sync_every=group_param_sync_every)
    config = DeslocConfig.from_arguments(param_sync_every=3, state_sync_every={"momentum_buffer": 6}, **groups)
    out = run_on_threads(_stop_signal, 4, config, 3, 3, 9)
    for rank in range(4):
        assert out[rank] == [step >= 7 for step in range(1, 10)], rank


@pytest.mark.parametrize("cfg, tau, world, lam", [
    (ref.Config("adam", 4, {"exp_avg": 8, "exp_avg_sq": 12}, lr=0.05, skip_calls=frozenset({5})), 2, 3, 1.0),
    (ref.Config("adam", 4, {"exp_avg": 6, "exp_avg_sq": 12}, lr=0.05), 3, 2, 1.0),
    (ref.Config("sgd", 3, {"momentum_buffer": 5}, lr=0.05, nesterov=True), 1, 2, 1.0),
    # overlap_local_weight: a quarter of the own progress, the rest the mean's extrapolated progress
    (ref.Config("adam", 4, {"exp_avg": 8, "exp_avg_sq": 12}, lr=0.05, skip_calls=frozenset({5})), 3, 3, 0.25),
    (ref.Config("sgd", 3, {"momentum_buffer": 5}, lr=0.05, nesterov=True), 2, 2, 0.0),
])
def test_overlapped_rounds_match_the_delayed_reference_after_every_step(cfg, tau, world, lam):
    n_calls = 22
    config = DeslocConfig(param_sync_every=cfg.param_sync_every, state_sync_every=cfg.state_sync_every,
                          overlap_steps=tau, overlap_local_weight=lam)
    out = run_on_threads(train, world, cfg, n_calls, config)
    want = ref.simulate_overlapped(cfg, n_calls, tau, workers=world, local_weight=lam)
    for call in range(n_calls + 1):
        for rank in range(world):
            ref.assert_snapshot_matches(out[rank]["history"][call], want[call][rank], f"call {call}, rank {rank}")
    # the ranks differ at every step after the first average (each keeps its own progress)
    last = [out[r]["history"][-1]["params"][0] for r in range(world)]
    assert not torch.equal(last[0], last[1])


@pytest.mark.parametrize("dropped", [False, True])
def test_the_local_weight_mix_by_hand_and_a_dropped_rank_keeps_the_mean(dropped):
    # live parameters [1.5, 2.5 | 3] and this rank's snapshot [1, 1.5, 1] with the landed mean [0.5, 1, 2]:
    # the delayed rule gives mean + own = [1, 2, 4]; with the previous mean [0, 0, 1] of the round 8 steps
    # earlier, 7 steps in flight, lam = 0.5: mean + 0.5 own + 0.5 (7 / 8) (mean - previous)
    # = [0.96875, 1.9375, 3.4375]; a rank left out by on_nonfinite takes the mean alone
    from lightning_desloc.overlap import OverlappedRounds, PendingRound
    rounds = OverlappedRounds(7, local_weight=0.5)
    live = [torch.tensor([1.5, 2.5]), torch.tensor([3.0])]
    mean, previous = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.0, 0.0, 1.0])
    rounds.previous_means[(0, (), 0)] = (8, previous)
    rounds.pending = [PendingRound(0, SyncPlan(16, True, (), False), 23,
                                   buckets={"params": [(torch.tensor([1.0, 1.5, 1.0]), mean)]},
                                   drop=torch.tensor(dropped))]
    opt = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    assert rounds.apply_due(0, 23, opt, lambda index, plan: {"params": live}, lambda control: None)
    want = [[0.5, 1.0], [2.0]] if dropped else [[0.96875, 1.9375], [3.4375]]
    assert [t.tolist() for t in live] == want
    step, kept = rounds.previous_means[(0, (), 0)]
    assert step == 16 and kept.tolist() == [0.5, 1.0, 2.0]


def _early_landing(rank, world, comm, heal):
    """K_x = 4, exp_avg every 4 (exp_avg_sq every 8), tau = 3: the round after step 4 is in flight after
    step 5. ``heal``: rank 2's exp_avg goes NaN and ``check_finite_now`` runs its healing round of
    everything, landing at once; else ``reach_consensus`` (the end of training) lands the round early."""
    cfg = ref.Config("adam", 4, {"exp_avg": 4, "exp_avg_sq": 8}, lr=0.05)
    config = DeslocConfig(param_sync_every=4, state_sync_every={"exp_avg": 4, "exp_avg_sq": 8}, overlap_steps=3,
                          on_nonfinite="heal" if heal else "raise")
    with _init:
        net, opt = make_worker(cfg)
    core = DeslocSync(config, comm=comm)
    core.attach([opt])
    history = []
    for call in range(5):
        local_step(core, net, opt, rank, call)
        history.append(snapshot(net, opt, cfg.state_keys()))
    in_flight = core.rounds.in_flight
    if heal:
        if rank == 2:
            opt.state[next(iter(net.parameters()))]["exp_avg"].fill_(float("nan"))
        before = snapshot(net, opt, cfg.state_keys())
        core.check_finite_now()
    else:
        before = history[-1]
        core.reach_consensus(net)
    return {"history": history, "before": before, "after": snapshot(net, opt, cfg.state_keys()),
            "in_flight": in_flight, "left": core.rounds.in_flight}


def _mean(tensors):
    return torch.stack(tensors).mean(dim=0)


def test_a_round_landing_early_uses_the_steps_it_was_in_flight_and_the_closing_round_is_exact():
    # the end of training after step 5 lands the round of step 4 (params and exp_avg) one step after its
    # snapshot: exp_avg <- beta1 mean(k_4) + (k_5 - beta1 k_4) (e = 1, not tau = 3), exp_avg_sq untouched;
    # then the closing round leaves every rank bit for bit the same parameters, the mean of the landed ones
    out = run_on_threads(_early_landing, 3, False)
    beta1 = 0.9
    assert all(r["in_flight"] == 1 and r["left"] == 0 for r in out)
    landed = []
    for r in out:
        for i, k5 in enumerate(r["before"]["state"]["exp_avg"]):
            k4 = r["history"][3]["state"]["exp_avg"][i]
            want = beta1 * _mean([o["history"][3]["state"]["exp_avg"][i] for o in out]) + (k5 - beta1 * k4)
            torch.testing.assert_close(r["after"]["state"]["exp_avg"][i], want, rtol=1e-12, atol=1e-14)
        assert all(torch.equal(a, b) for a, b in zip(r["after"]["state"]["exp_avg_sq"], r["before"]["state"]["exp_avg_sq"]))
        landed.append([_mean([o["history"][3]["params"][i] for o in out]) + (x5 - r["history"][3]["params"][i])
                       for i, x5 in enumerate(r["before"]["params"])])
    for i in range(len(landed[0])):
        torch.testing.assert_close(out[0]["after"]["params"][i], _mean([ls[i] for ls in landed]), rtol=1e-12, atol=1e-14)
        assert all(torch.equal(out[0]["after"]["params"][i], r["after"]["params"][i]) for r in out[1:])


def test_a_healing_round_before_a_save_leaves_the_finite_ranks_mean_with_overlap():
    # on_nonfinite="heal" with overlap_steps: check_finite_now first lands the round of step 4 (e = 1), then
    # its full round of everything lands at once (e = 0): every rank, the NaN one too, holds exactly the
    # finite ranks' (0 and 1) mean of what they held after that landing
    out = run_on_threads(_early_landing, 3, True)
    beta1 = 0.9
    assert all(r["in_flight"] == 1 and r["left"] == 0 for r in out)

    def at(r, what, i, step):  # rank r's value after step 4 or 5 (5: just before check_finite_now)
        snap = r["history"][step - 1] if step == 4 else r["before"]
        return snap["params"][i] if what == "params" else snap["state"][what][i]

    for what, decay in (("params", 1.0), ("exp_avg", beta1), ("exp_avg_sq", None)):  # exp_avg_sq: not in it
        for i in range(len(out[0]["after"]["params"])):
            if decay is None:
                landed = [at(r, what, i, 5) for r in out[:2]]
            else:
                mean4 = _mean([at(r, what, i, 4) for r in out])
                landed = [decay * mean4 + (at(r, what, i, 5) - decay * at(r, what, i, 4)) for r in out[:2]]
            values = [r["after"]["params"][i] if what == "params" else r["after"]["state"][what][i] for r in out]
            torch.testing.assert_close(values[0], _mean(landed), rtol=1e-12, atol=1e-14, msg=f"{what} {i}")
            assert all(torch.equal(values[0], v) for v in values[1:]), (what, i)


def test_overlap_steps_must_be_shorter_than_every_period():
    with pytest.raises(ValueError, match=r"overlap_steps=4 must be shorter than every period.*'param_sync_every': 4"):
        DeslocConfig(param_sync_every=4, overlap_steps=4)
    with pytest.raises(ValueError, match=r"\"state_sync_every\['exp_avg'\]\": 3"):
        DeslocConfig(param_sync_every=8, state_sync_every={"exp_avg": 3, "exp_avg_sq": 48}, overlap_steps=3)
    with pytest.raises(ValueError, match="cannot be combined with compression, outer_lr yet"):
        DeslocConfig.from_arguments(param_sync_every=8, overlap_steps=2, compression="bf16", outer_lr=0.7)
    with pytest.raises(ValueError, match="overlap_steps must be a number of optimizer steps >= 0"):
        DeslocConfig(overlap_steps=-1)
    with pytest.raises(ValueError, match=r"overlap_local_weight=0.5 only applies to overlapped rounds; set overlap_steps"):
        DeslocConfig(param_sync_every=8, overlap_local_weight=0.5)
    with pytest.raises(ValueError, match=r"overlap_local_weight must be a number in \[0, 1\], got 1.5"):
        DeslocConfig(param_sync_every=8, overlap_steps=7, overlap_local_weight=1.5)


def _resumable_overlapped(rank, world, comm, stop_at, lam=1.0):
    """Like ``_resumable`` with ``overlap_steps=2``: a save at ``stop_at`` falls while a round is in flight
    (``lam``: ``overlap_local_weight``, whose last parameter mean is saved too)."""
    config = DeslocConfig(param_sync_every=3, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6}, overlap_steps=2,
                          overlap_local_weight=lam)
    with _init:
        net, opt = make_worker(ADAM)
    core = DeslocSync(config, comm=comm)
    core.attach([opt])
    in_flight_at_save = None
    for call in range(12):
        if call == stop_at:
            in_flight_at_save = core.rounds.in_flight
            core, net, opt = _save_and_rebuild(core, net, opt, config, comm)
        local_step(core, net, opt, rank, call)
    return [p.detach().clone() for p in net.parameters()], in_flight_at_save


@pytest.mark.parametrize("stop_at, lam", [(4, 1.0), (7, 1.0), (7, 0.5)])  # after steps 4 and 7: the rounds
def test_a_round_in_flight_survives_a_save_and_resume_bit_for_bit(stop_at, lam):  # of steps 3 and 6 are in flight
    straight = run_on_threads(_resumable_overlapped, 2, None, lam)
    resumed = run_on_threads(_resumable_overlapped, 2, stop_at, lam)
    for rank in range(2):
        assert resumed[rank][1] >= 1
        assert all(torch.equal(a, b) for a, b in zip(straight[rank][0], resumed[rank][0])), rank


def test_an_optimizer_with_a_history_of_tensors_is_refused_at_its_first_step():
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.LBFGS(net.parameters(), history_size=3)
    core = DeslocSync(DeslocConfig(param_sync_every=2))
    core.attach([opt])
    x = torch.randn(8, 3)

    def closure():
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss

    i = core.begin_step(opt)
    opt.step(closure)
    with pytest.raises(ValueError, match=r"LBFGS keeps state .*'old_dirs'.*strategy='ddp'"):
        core.after_step(i, opt)


# ----------------------------------------------------------------------------------------------- fragments
FRAGMENTED = ref.Config("adam", param_sync_every=4, state_sync_every={"exp_avg": 8, "exp_avg_sq": 12}, lr=0.05,
                        fragments=2)


@pytest.mark.parametrize("tau, lam", [(0, 1.0), (1, 1.0), (1, 0.5)])
def test_fragments_match_the_reference_after_every_step(tau, lam):
    # fragment 0 = [W1] (35 elements), fragment 1 = [b1, W2, b2] (31): offsets 0 and 2; with lam < 1 each
    # fragment extrapolates from its own previous mean
    n_calls = 13
    config = DeslocConfig(param_sync_every=4, state_sync_every={"exp_avg": 8, "exp_avg_sq": 12}, fragments=2,
                          overlap_steps=tau, overlap_local_weight=lam)
    out = run_on_threads(train, 3, FRAGMENTED, n_calls, config)
    want = (ref.simulate(FRAGMENTED, n_calls, workers=3) if tau == 0
            else ref.simulate_overlapped(FRAGMENTED, n_calls, tau, workers=3, local_weight=lam))
    for call in range(n_calls + 1):
        for rank in range(3):
            ref.assert_snapshot_matches(out[rank]["history"][call], want[call][rank], f"call {call}, rank {rank}")
    # by hand, float64: fragment 0's params after s = 4, 8, 12, its exp_avg after 8, exp_avg_sq after 12;
    # fragment 1's params after s = 2, 6, 10, exp_avg after 2 and 10, exp_avg_sq after 2 (offset 2: s - 2 = 0)
    f0, f1 = 35 * 8, 31 * 8
    ledger = out[0]["core"].ledger
    assert dict(ledger.bytes) == {"params": 3 * f0 + 3 * f1, "state/exp_avg": f0 + 2 * f1,
                                  "state/exp_avg_sq": f0 + f1, "control": 6 * (1 + 3) * 4}
    # the largest round is fragment 1's at s = 2 (params and both states), not a whole-model round
    assert ledger.largest_round_bytes == 3 * f1 + 4 * (1 + 3)  # and the control tensor: the signal, 3 flags


def test_fragments_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"fragments=3 must divide param_sync_every=8"):
        DeslocConfig(param_sync_every=8, fragments=3)
    with pytest.raises(ValueError, match=r"fragments=2 cannot be combined with compression"):
        DeslocConfig(param_sync_every=8, fragments=2, compression="bf16")
    with pytest.raises(ValueError, match=r"state_policy='reset'"):
        DeslocConfig(param_sync_every=8, fragments=2, state_policy="reset")
    core = DeslocSync(DeslocConfig(param_sync_every=8, fragments=4))
    net = torch.nn.Linear(3, 1)  # two parameter tensors cannot make four fragments
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    core.attach([opt])
    net(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"leaves fragment\(s\) \[0, 2\].*sizes \[3, 1\].*fewer fragments"):
        for _ in range(8):
            i = core.begin_step(opt)
            opt.step()
            core.after_step(i, opt)
