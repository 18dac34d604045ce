"""``on_nonfinite`` together with the other mechanisms, on real gloo processes.

Expectations come from :func:`simulate_with`, a simulator written here from the rules alone (no package
code), on the reference model of ``reference.py`` (its data, its float64 Adam by hand, its gradient with
``loss * inf`` on the poisoned call, no grad scaler: the infinite gradient goes into the update). Right
after step ``s`` everything due is averaged over the finite workers (a worker counts when every value
the round carries is finite; with groups a group counts when all its workers do) and every worker takes
that mean; with ``"heal"``, when a worker was left out of a round that did not leave it with nothing
non-finite of its own, the round of the next step carries the parameters and every averaged state (itself
over the finite workers). On top of that, per mechanism:

* ``group_size=g``: inside each group of ``g`` consecutive workers every worker steps on the group's mean
  gradient (so a poisoned worker's inf reaches its group); the outer rounds are the world means above,
  over the workers of the finite groups;
* ``state_policy="keep_local"``: no state is ever averaged; the healing round carries the parameters
  only, and right before it (after that step's local update) the left-out workers zero their tensor
  states (``exp_avg``, ``exp_avg_sq``; Adam's counter ``t`` is kept); that round heals;
* ``state_policy="reset"``: no state is averaged, every worker zeroes its tensor states right after each
  parameter round, so that round heals by itself;
* ``outer_lr``: after every parameter round (the healing one too), with ``x_g`` the last global parameters
  and ``xbar`` the round's mean: ``g = x_g - xbar``, ``b = g`` (first) or ``mu b + g``,
  ``x_g <- x_g - lr (g + mu b)`` (Nesterov) or ``x_g - lr b``, and every worker takes ``x_g``;
* ``ddp_warmup_steps=N``: the first ``N`` steps every worker steps on the mean gradient of all workers and
  nothing else is averaged; the schedule then counts ``s - N``;
* compression: the simulation stays exact; the tolerance is derived from the codec (see
  :func:`codec_tolerance`).

Log messages and the step of the raise are checked against hand-worked expectations.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import reference as ref
from helpers import run_on_processes
from lightning_desloc.config import AutoConfig, DeslocConfig
from test_nonfinite import HEALTHY, NAN_TOL, PERIODS, POISONED, _train_core, assert_matches, finite, simulate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KEYS = ("exp_avg", "exp_avg_sq")
N_CALLS = 12


# --------------------------------------------------------------------------- the simulator
def simulate_with(cfg: ref.Config, n_calls: int, workers: int, mode, *, group_size: int = 1,
                  state_policy: str = "average", outer: tuple | None = None, warmup: int = 0):
    """``(history, events)``: ``history[c][m]`` is worker ``m`` after call ``c`` and its round
    (``history[0]``: the start); ``events`` one ``(step, bad groups, carried everything)`` per round that
    left someone out (``step`` counted from 1 over all optimizer steps, the warm-up's included).
    ``outer``: ``(lr, momentum, nesterov)``. With ``mode="raise"`` it stops after the first such round
    (every rank raises one step later, before that step's round)."""
    team = [ref.Worker(params=[p.clone() for p in ref.start_params(0, cfg.seed)]) for _ in range(workers)]
    groups = [list(range(a, a + group_size)) for a in range(0, workers, group_size)]
    history = [[w.snapshot() for w in team]]
    events: list[tuple[int, list[int], bool]] = []
    x_g = [p.clone() for p in team[0].params]  # the global parameters of the outer step
    momentum_buffer = None
    pending = None  # the workers left out of a round that calls for a healing round at the next step
    for s in range(1, n_calls + 1):
        grads = [ref.gradient(cfg, w.params, m, s - 1) for m, w in enumerate(team)]
        for members in ([list(range(workers))] if s <= warmup else groups if group_size > 1 else []):
            mean = [torch.stack([grads[m][i] for m in members]).mean(dim=0) for i in range(len(grads[0]))]
            for m in members:
                grads[m] = [g.clone() for g in mean]
        for m, w in enumerate(team):
            ref.adam_update(cfg, w, grads[m], cfg.lr_at(s))
        if s > warmup:
            local = s - warmup
            params_due = local % cfg.param_sync_every == 0
            states_due = [k for k in KEYS if state_policy == "average" and local % cfg.state_sync_every[k] == 0]
            healing = pending is not None
            if healing:
                params_due = True
                if state_policy == "average":
                    states_due = list(KEYS)
                if state_policy == "keep_local":
                    for m in pending:  # after this step's local update, before the round
                        for k in KEYS:
                            team[m].state[k] = [torch.zeros_like(t) for t in team[m].state[k]]
                pending = None
            if params_due or states_due:
                def carried(w):
                    return (w.params if params_due else []) + [t for k in states_due for t in w.state[k]]

                ok = [all(bool(torch.isfinite(t).all()) for t in carried(w)) for w in team]
                good_group = [all(ok[m] for m in members) for members in groups]
                counted = [m for members, good in zip(groups, good_group) if good or mode is None for m in members]
                if params_due:
                    mean = [torch.stack([team[m].params[i] for m in counted]).mean(dim=0) for i in range(len(x_g))]
                    if outer is not None:
                        lr, mu, nesterov = outer
                        g = [a - b for a, b in zip(x_g, mean)]
                        momentum_buffer = ([t.clone() for t in g] if momentum_buffer is None else
                                           [mu * b + t for b, t in zip(momentum_buffer, g)])
                        direction = [t + mu * b for t, b in zip(g, momentum_buffer)] if nesterov and mu else (
                            momentum_buffer if mu else g)
                        x_g = [a - lr * d for a, d in zip(x_g, direction)]
                        mean = x_g
                    for w in team:
                        w.params = [t.clone() for t in mean]
                for k in states_due:
                    mean = [torch.stack([team[m].state[k][i] for m in counted]).mean(dim=0) for i in range(len(x_g))]
                    for w in team:
                        w.state[k] = [t.clone() for t in mean]
                if params_due and state_policy == "reset" and not healing:
                    for w in team:
                        w.state = {k: [torch.zeros_like(t) for t in w.state[k]] for k in KEYS}
                everything = {"average": params_due and set(states_due) == set(KEYS) or healing,
                              "keep_local": healing, "reset": params_due}[state_policy]
                bad = [a for a, good in enumerate(good_group) if not good]
                if bad and mode is not None:
                    events.append((s, bad, everything))
                    if mode == "heal" and not everything:
                        pending = [m for a in bad for m in groups[a]]
        history.append([w.snapshot() for w in team])
        if mode == "raise" and events:
            break
    return history, events


# --------------------------------------------------------------------------- the core on real gloo processes
def _train(rank: int, cfg: ref.Config, n_calls: int, mode, options: dict) -> dict:
    """One rank: the reference model as plain leaf tensors, torch's Adam, the core over the world group;
    ``options``: more arguments of :meth:`DeslocConfig.from_arguments` (``auto_warmup_steps``: the
    warm-up of ``param_sync_every="auto"``)."""
    options = dict(options)
    auto_warmup = options.pop("auto_warmup_steps", None)
    arguments = dict(param_sync_every=cfg.param_sync_every, state_sync_every=cfg.state_sync_every,
                     on_nonfinite=mode, ddp_warmup_steps=cfg.ddp_warmup_steps)
    arguments.update(options)
    config = DeslocConfig.from_arguments(**arguments)
    if auto_warmup is not None:
        config = dataclasses.replace(config, auto=AutoConfig(warmup_steps=auto_warmup))
    return _train_core(rank, cfg, n_calls, mode, config=config)


BF16 = {"compression": {"exp_avg": "bf16"}}
INT8 = {"compression": {"params": "int8"}}
KEEP_LOCAL = {"state_policy": "keep_local", "state_sync_every": None}
RESET = {"state_policy": "reset", "state_sync_every": None}
OUTER = {"outer_lr": 0.7}  # outer_momentum=0.9, Nesterov: the defaults
OUTER_PLAIN = {"outer_lr": 0.7, "outer_momentum": 0.0}
# rank 2's gradient infinite at call 6: step 7, the first parameter round after the 3 warm-up steps
WARM_POISONED = dataclasses.replace(POISONED, skip_calls=frozenset({6}), ddp_warmup_steps=3)
WARM_HEALTHY = dataclasses.replace(HEALTHY, ddp_warmup_steps=3)

THREE = {
    "bf16-healthy-heal": (HEALTHY, "heal", BF16), "bf16-healthy-None": (HEALTHY, None, BF16),
    "bf16-heal": (POISONED, "heal", BF16), "bf16-raise": (POISONED, "raise", BF16),
    "int8-healthy-heal": (HEALTHY, "heal", INT8), "int8-healthy-None": (HEALTHY, None, INT8),
    "int8-heal": (POISONED, "heal", INT8), "int8-raise": (POISONED, "raise", INT8),
    "keep_local-heal": (POISONED, "heal", KEEP_LOCAL),
    "reset-heal": (POISONED, "heal", RESET),
    "outer-heal": (POISONED, "heal", OUTER), "outer-plain-heal": (POISONED, "heal", OUTER_PLAIN),
    "warmup-heal": (WARM_POISONED, "heal", {}), "warmup-raise": (WARM_POISONED, "raise", {}),
    "warmup-healthy-raise": (WARM_HEALTHY, "raise", {}),
}
FOUR = {"groups-heal": (POISONED, "heal", {"group_size": 2}), "groups-raise": (POISONED, "raise", {"group_size": 2})}
TWO = {"drift-raise": (HEALTHY, "raise", {"max_drift": 1e-3, "drift_check_every": 2}),
       "auto-raise": (HEALTHY, "raise", {"param_sync_every": "auto", "state_sync_every": None,
                                          "auto_warmup_steps": 4})}


def _runs(rank: int, world: int, out: str, table: dict) -> None:
    runs = {name: _train(rank, cfg, N_CALLS, mode, options) for name, (cfg, mode, options) in table.items()}
    torch.save(runs, f"{out}/rank{rank}.pt")


def _fixture(tmp_path_factory, name: str, world: int, table: dict):
    out = tmp_path_factory.mktemp(name)
    run_on_processes(_runs, world, str(out), table)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _fixture(tmp_path_factory, "combined3", 3, THREE)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _fixture(tmp_path_factory, "combined4", 4, FOUR)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _fixture(tmp_path_factory, "combined2", 2, TWO)


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])) and all(
        torch.equal(x, y) for k in b["state"] for x, y in zip(a["state"][k], b["state"][k]))


def _check_history(run: dict, want: list, rank: int, label: str, upto: int = N_CALLS) -> None:
    got = run["history"]
    assert len(got) == upto + 1, f"{label}: rank {rank} has {len(got) - 1} steps, {upto} expected"
    for call in range(1, upto + 1):
        assert_matches(got[call], want[call][rank], f"{label}: rank {rank} after step {call}")


# --------------------------------------------------------------------------- the simulator itself
def test_the_simulator_without_options_is_the_plain_one():
    """With no option :func:`simulate_with` is ``test_nonfinite.simulate`` (written apart): a check of both."""
    for mode in (None, "heal"):
        mine, _ = simulate_with(POISONED, N_CALLS, 3, mode)
        theirs = simulate(POISONED, N_CALLS, 3, mode)
        for c in range(N_CALLS + 1):
            for r in range(3):
                assert_matches(mine[c][r], theirs[c][r], f"{mode}, worker {r} after step {c}")


# --------------------------------------------------------------------------- 1. compression
#: Adam's step is at most about lr (1 - b1) / sqrt(1 - b2) ~ 3.2 lr per element (Kingma & Ba, sec. 2.1)
ADAM_STEP = POISONED.lr * (1 - POISONED.betas[0]) / math.sqrt(1 - POISONED.betas[1])
BF16_REL = 2.0**-8  # bf16 keeps 8 significant bits: each rank's value and the mean rounded once, 2^-9 each


def codec_tolerance(codec: str, call: int, want: list) -> dict[str, float]:
    """The absolute tolerance, per quantity, of a compressed run against the exact simulation after step
    ``call`` (0: exact, ``NAN_TOL``). Written from the codec:

    * ``{"exp_avg": "bf16"}``: exp_avg travels coded in the full round after step 9 and at step 12; before
      step 9 the run is exact and so are the parameters after step 9's update. A coded mean is off by at
      most ``2^-8 max|exp_avg|`` (``U``, from the simulation); each later Adam step then moves by at most
      ``ADAM_STEP * 2^-8``, one per step since 9, and exp_avg_sq only through the gradients at parameters
      that far apart (second order: below ``2^-8`` of its largest value);
    * ``{"params": "int8"}``: the parameters travel from step 4 on, as their change since the last
      consensus, at most ``K_x * ADAM_STEP`` per element; one int8 step is that over 127 and each round
      rounds twice (each rank's message, then the mean: half a step each). Error feedback keeps it from
      adding up, so every later value stays within that, twice for the training in between; the states
      see it through the gradients only.

    A rank left in (a NaN) or a mean not rescaled by ``M / n`` (2/3 of the finite mean, ~0.3 off for the
    parameters) is far outside every one of these."""
    finite_workers = [snap for row in want for snap in row if finite(snap)]
    u_max = max(float(t.abs().max()) for snap in finite_workers for t in snap["state"].get("exp_avg", [torch.zeros(1)]))
    v_max = max(float(t.abs().max()) for snap in finite_workers for t in snap["state"].get("exp_avg_sq", [torch.zeros(1)]))
    if codec == "bf16":
        if call <= 8:
            return {}
        later = (call - 9) * ADAM_STEP * BF16_REL
        return {"params": later, "exp_avg": BF16_REL * u_max + later, "exp_avg_sq": BF16_REL * v_max if call > 9 else 0}
    if call < 4:
        return {}
    step = POISONED.param_sync_every * ADAM_STEP / 127
    return {"params": 2 * step, "exp_avg": 2 * step, "exp_avg_sq": BF16_REL * v_max}


def assert_close_within(got: dict, want: dict, tol: dict, where: str) -> None:
    if not tol:
        return assert_matches(got, want, where)
    torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=max(tol["params"], 1e-12),
                               msg=lambda m: f"{where}, params: {m}")
    for key in KEYS:
        torch.testing.assert_close(got["state"][key], want["state"][key], rtol=0, atol=max(tol[key], 1e-12),
                                   equal_nan=True, msg=lambda m: f"{where}, {key}: {m}")


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_compressed_healthy_run_is_bit_identical_with_the_guard(three_ranks, codec):
    for r, runs in enumerate(three_ranks):
        guarded, plain = runs[f"{codec}-healthy-heal"], runs[f"{codec}-healthy-None"]
        assert guarded["raised"] is None and guarded["messages"] == [] and len(guarded["history"]) == N_CALLS + 1
        for call, (a, b) in enumerate(zip(guarded["history"], plain["history"])):
            assert _equal(a, b), f"{codec}: rank {r} differs after step {call}"


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_compressed_heal_matches_the_simulation_and_leaves_every_rank_equal(three_ranks, codec):
    want = simulate(POISONED, N_CALLS, 3, "heal")
    mine, events = simulate_with(POISONED, N_CALLS, 3, "heal")
    assert events == [(8, [2], False), (9, [2], True)]
    for r, runs in enumerate(three_ranks):
        run = runs[f"{codec}-heal"]
        assert run["raised"] is None and len(run["history"]) == N_CALLS + 1
        for call in range(1, N_CALLS + 1):
            assert_close_within(run["history"][call], want[call][r], codec_tolerance(codec, call, want),
                                f"{codec}: rank {r} after step {call}")
        assert all(finite(run["history"][c]) for c in range(9, N_CALLS + 1)), f"{codec}: rank {r} not healed"
        assert torch.isfinite(run["history"][8]["params"][0]).all()  # left out of step 8's round, given the mean
    assert not finite(three_ranks[2][f"{codec}-heal"]["history"][8])  # its states: NaN until step 9's round
    for c in (9, 12):  # right after a round every rank applied the same decoded bytes: identical parameters
        for r in (1, 2):
            assert all(torch.equal(a, b) for a, b in zip(three_ranks[0][f"{codec}-heal"]["history"][c]["params"],
                                                         three_ranks[r][f"{codec}-heal"]["history"][c]["params"])), (c, r)
    messages = three_ranks[0][f"{codec}-heal"]["messages"]
    assert len(messages) == 2 and all("rank(s) [2] of 3" in m for m in messages)
    assert "after optimizer step 8" in messages[0] and "averages the parameters and every state once more" in messages[0]
    assert "after optimizer step 9" in messages[1] and "they are healed" in messages[1]
    assert three_ranks[1][f"{codec}-heal"]["messages"] == three_ranks[2][f"{codec}-heal"]["messages"] == []


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_compressed_raise_stops_every_rank_at_step_9(three_ranks, codec):
    want = simulate(POISONED, 8, 3, "heal")
    for r, runs in enumerate(three_ranks):
        run = runs[f"{codec}-raise"]
        assert run["raised"] is not None, f"{codec}: rank {r} did not raise"
        step, message = run["raised"]
        assert step == 9 and "rank(s) [2] of 3" in message and "after optimizer step 8" in message, (r, message)
        for call in range(1, 9):
            assert_close_within(run["history"][call], want[call][r], codec_tolerance(codec, call, want),
                                f"{codec} raise: rank {r} after step {call}")


# --------------------------------------------------------------------------- 2. hierarchical groups
def test_groups_heal_leaves_the_whole_group_out_then_runs_a_full_round(four_ranks):
    want, events = simulate_with(POISONED, N_CALLS, 4, "heal", group_size=2)
    assert events == [(8, [1], False), (9, [1], True)]
    assert not finite(want[8][3]) and finite(want[8][1])  # rank 2's inf reached rank 3 through the gradients
    for r, runs in enumerate(four_ranks):
        run = runs["groups-heal"]
        assert run["raised"] is None
        _check_history(run, want, r, "groups heal")
        assert all(finite(run["history"][c]) for c in range(9, N_CALLS + 1)), f"rank {r} not healed"
    messages = four_ranks[0]["groups-heal"]["messages"]
    assert len(messages) == 2 and all("group(s) [1] of 2 (ranks [2, 3])" in m for m in messages)
    assert "after optimizer step 8" in messages[0] and "after optimizer step 9" in messages[1]
    assert "they are healed" in messages[1]
    assert all(runs["groups-heal"]["messages"] == [] for runs in four_ranks[1:])


def test_groups_raise_stops_all_four_ranks_at_step_9(four_ranks):
    want, events = simulate_with(POISONED, N_CALLS, 4, "raise", group_size=2)
    assert events == [(8, [1], False)] and len(want) == 9
    for r, runs in enumerate(four_ranks):
        run = runs["groups-raise"]
        assert run["raised"] is not None, f"rank {r} did not raise"
        step, message = run["raised"]
        assert step == 9 and "group(s) [1] of 2 (ranks [2, 3])" in message and "after optimizer step 8" in message
        _check_history(run, want, r, "groups raise", upto=8)


# --------------------------------------------------------------------------- 3. / 4. state policies
def test_keep_local_heal_zeroes_the_left_out_ranks_states_and_averages_the_parameters_again(three_ranks):
    want, events = simulate_with(POISONED, N_CALLS, 3, "heal", state_policy="keep_local")
    assert events == [(8, [2], False), (9, [2], True)]
    for r, runs in enumerate(three_ranks):
        run = runs["keep_local-heal"]
        assert run["raised"] is None
        _check_history(run, want, r, "keep_local heal")
        assert all(finite(run["history"][c]) for c in range(9, N_CALLS + 1)), f"rank {r} not healed"
    h2 = three_ranks[2]["keep_local-heal"]["history"][9]
    assert all(torch.equal(t, torch.zeros_like(t)) for k in KEYS for t in h2["state"][k])  # zeroed, not averaged
    assert not any(torch.equal(t, torch.zeros_like(t)) for t in three_ranks[0]["keep_local-heal"]["history"][9]["state"]["exp_avg"])
    messages = three_ranks[0]["keep_local-heal"]["messages"]
    assert len(messages) == 2 and all("rank(s) [2] of 3" in m for m in messages)
    assert "after optimizer step 8" in messages[0] and "they were zeroed" in messages[0]
    assert "after optimizer step 9" in messages[1] and "they are healed" in messages[1]
    # rounds: 4, 8, 9 (the parameters again), 12; never a state
    assert three_ranks[0]["keep_local-heal"]["rounds"] == {"params": 4, "control": 4}


def test_reset_heal_is_healed_by_the_parameter_round_itself(three_ranks):
    want, events = simulate_with(POISONED, N_CALLS, 3, "heal", state_policy="reset")
    assert events == [(8, [2], True)]
    for r, runs in enumerate(three_ranks):
        run = runs["reset-heal"]
        assert run["raised"] is None
        _check_history(run, want, r, "reset heal")
        assert all(finite(run["history"][c]) for c in range(8, N_CALLS + 1)), f"rank {r} not healed at step 8"
        assert all(torch.equal(t, torch.zeros_like(t)) for k in KEYS for t in run["history"][8]["state"][k])
    messages = three_ranks[0]["reset-heal"]["messages"]
    assert len(messages) == 1 and "rank(s) [2] of 3" in messages[0] and "after optimizer step 8" in messages[0]
    assert "they are healed" in messages[0]
    assert three_ranks[0]["reset-heal"]["rounds"] == {"params": 3, "control": 3}  # no extra round


# --------------------------------------------------------------------------- 5. the outer step
@pytest.mark.parametrize("name, outer", [("outer-heal", (0.7, 0.9, True)), ("outer-plain-heal", (0.7, 0.0, True))])
def test_outer_step_heal_applies_the_outer_step_to_every_parameter_round(three_ranks, name, outer):
    want, events = simulate_with(POISONED, N_CALLS, 3, "heal", outer=outer)
    assert events == [(8, [2], False), (9, [2], True)]
    plain, _ = simulate_with(POISONED, N_CALLS, 3, "heal")
    assert (want[9][0]["params"][0] - plain[9][0]["params"][0]).abs().max() > 1e-3  # the outer step shows
    for r, runs in enumerate(three_ranks):
        run = runs[name]
        assert run["raised"] is None
        _check_history(run, want, r, name)
        assert all(finite(run["history"][c]) for c in range(9, N_CALLS + 1)), f"rank {r} not healed"
    messages = three_ranks[0][name]["messages"]
    assert len(messages) == 2 and "after optimizer step 8" in messages[0] and "they are healed" in messages[1]


def test_outer_step_simulation_without_the_healing_round_differs():
    """The healing round after step 9 takes an outer step too: without it step 9 would end elsewhere."""
    want, _ = simulate_with(POISONED, 9, 3, "heal", outer=(0.7, 0.9, True))
    mean_only, _ = simulate_with(POISONED, 9, 3, "heal")
    assert not torch.allclose(want[9][0]["params"][0], mean_only[9][0]["params"][0])


# --------------------------------------------------------------------------- 6. the DDP warm-up
def test_warmup_heal_matches_the_simulation(three_ranks):
    want, events = simulate_with(WARM_POISONED, N_CALLS, 3, "heal", warmup=3)
    assert events == [(7, [2], False), (8, [2], True)]
    for r, runs in enumerate(three_ranks):
        run = runs["warmup-heal"]
        assert run["raised"] is None
        _check_history(run, want, r, "warm-up heal")
        assert not finite(run["history"][7]) if r == 2 else finite(run["history"][7])
        assert all(finite(run["history"][c]) for c in range(8, N_CALLS + 1)), f"rank {r} not healed"
    messages = three_ranks[0]["warmup-heal"]["messages"]
    assert len(messages) == 2 and all("rank(s) [2] of 3" in m for m in messages)
    assert "they are healed" in messages[1]
    for r, runs in enumerate(three_ranks):  # raise: one step after the round of step 7
        step, message = runs["warmup-raise"]["raised"]
        assert step == 8 and "rank(s) [2] of 3" in message, (r, message)
        _check_history(runs["warmup-raise"], want, r, "warm-up raise", upto=7)


def test_warmup_messages_name_the_optimizer_step(three_ranks):
    messages = three_ranks[0]["warmup-heal"]["messages"]
    assert "after optimizer step 7" in messages[0] and "after optimizer step 8" in messages[1]
    _, message = three_ranks[0]["warmup-raise"]["raised"]
    assert "after optimizer step 7" in message


def test_warmup_healthy_raise_run_raises_nothing(three_ranks):
    want, events = simulate_with(WARM_HEALTHY, N_CALLS, 3, "raise", warmup=3)
    assert events == []
    for r, runs in enumerate(three_ranks):
        run = runs["warmup-healthy-raise"]
        assert run["raised"] is None and run["messages"] == []
        _check_history(run, want, r, "warm-up healthy")
    # 3 warm-up gradient rounds (each with the signals), then the parameter rounds of steps 7 and 11
    assert three_ranks[0]["warmup-healthy-raise"]["rounds"] == {"grads": 3, "control": 5, "params": 2}


# --------------------------------------------------------------------------- 7. max_drift, "auto"
def test_drift_trigger_and_auto_periods_run_with_the_guard(two_ranks):
    for r, runs in enumerate(two_ranks):
        for name in ("drift-raise", "auto-raise"):
            run = runs[name]
            assert run["raised"] is None and run["messages"] == [], (r, name)
            assert len(run["history"]) == N_CALLS + 1 and all(finite(h) for h in run["history"][1:]), (r, name)
    # max_drift=1e-3, checked every 2 steps: early parameter rounds besides steps 4, 8 and 12
    assert two_ranks[0]["drift-raise"]["rounds"]["params"] > 3
    assert two_ranks[0]["auto-raise"]["rounds"]["params"] >= 1  # the timed round after the 4 warm-up steps
    for name in ("drift-raise", "auto-raise"):  # the first parameter round (step 4 at the latest) equalises the ranks
        assert all(torch.equal(a, b) for a, b in zip(two_ranks[0][name]["history"][4]["params"],
                                                     two_ranks[1][name]["history"][4]["params"])), name
