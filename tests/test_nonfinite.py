"""``on_nonfinite``: a rank whose round holds a NaN or inf, on real gloo processes.

Expectations come from a small simulator written here from the rule alone (no package code): M
workers of the reference model (``reference.py``: its data, its float64 Adam by hand, its gradient with
``loss * inf`` on the poisoned call); right after step ``s`` everything due is averaged over the workers
whose due values are all finite, every worker takes that mean, and when a worker was left out of a
round that did not carry the parameters and every state, the round after the next step carries all of
them (itself over the finite workers). The default (``None``) is simulated too: a plain mean, NaN
everywhere. Byte counts are worked out by hand.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from lightning.pytorch.callbacks import Callback

import reference as ref
from fake_comm import run_on_threads
from helpers import START_METHOD, Mlp, Recorder, run_on_processes
from lightning_desloc import DeslocStrategy
from lightning_desloc.comm import Comm
from lightning_desloc.config import ARGUMENT_DOCS, DeslocConfig
from lightning_desloc.fabric import DeslocFabricStrategy
from lightning_desloc.nonfinite import NonfiniteGuard
from lightning_desloc.sync import SIGNALS, DeslocSync

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FLOAT32 = 4
PERIODS = {"exp_avg": 12, "exp_avg_sq": 24}  # K_x = 4: step 8's round carries the parameters only
ALL = ("params", "exp_avg", "exp_avg_sq")
NAN_TOL = dict(rtol=1e-10, atol=1e-12, equal_nan=True)


# --------------------------------------------------------------------------- the simulator
def simulate(cfg: ref.Config, n_calls: int, workers: int, mode) -> list[list[dict]]:
    """``history[c][m]``: worker ``m`` after call ``c`` and its round (``history[0]``: the start).
    ``mode``: ``None`` (plain mean) or ``"heal"`` (mean of the finite workers, then a full round)."""
    team = [ref.Worker(params=[p.clone() for p in ref.start_params(0, cfg.seed)]) for _ in range(workers)]
    history = [[w.snapshot() for w in team]]
    full_round_next = False
    everything = [(what, i) for what in ALL for i in range(len(team[0].params))]
    for s in range(1, n_calls + 1):
        for m, w in enumerate(team):  # no AMP scaler: an infinite gradient goes into the update and the states
            ref.adam_update(cfg, w, ref.gradient(cfg, w.params, m, s - 1), cfg.lr_at(s))
        # (what, tensor position): with fragments=F only the due fragments' tensors (reference.due_items)
        due = [(what, i) for what, positions in ref.due_items(cfg, s) for i in positions]
        if mode == "heal" and full_round_next:
            due, full_round_next = everything, False
        if due:
            def values(w, what):
                return w.params if what == "params" else w.state[what]

            finite = [all(bool(torch.isfinite(values(w, what)[i]).all()) for what, i in due) for w in team]
            counted = [w for w, ok in zip(team, finite) if ok or mode is None]
            for what, i in due:
                mean = torch.stack([values(w, what)[i] for w in counted]).mean(dim=0)
                for w in team:
                    values(w, what)[i] = mean.clone()
            if mode == "heal" and not all(finite) and set(due) != set(everything):
                full_round_next = True
        history.append([w.snapshot() for w in team])
    return history


def simulate_overlapped_heal(cfg: ref.Config, n_calls: int, workers: int, tau: int) -> list[list[dict]]:
    """:func:`simulate` with ``on_nonfinite="heal"`` and ``overlap_steps=tau``, from the equations alone:
    the round due after step ``s`` flags each worker on its values at ``s`` (the snapshot) and lands right
    after step ``s + tau``: with ``g`` the mean of the finite workers' snapshots and ``d = beta ** tau``
    (1 for the parameters), a finite worker takes ``d g + (now - d snapshot)``, a non-finite one ``d g``
    (``exp_avg_sq`` clamped at 0). When a landed round left a worker out and did not carry everything,
    the round of step ``s + tau + 1`` carries the parameters and every state (itself overlapped)."""
    team = [ref.Worker(params=[p.clone() for p in ref.start_params(0, cfg.seed)]) for _ in range(workers)]
    history = [[w.snapshot() for w in team]]
    everything = [(what, i) for what in ALL for i in range(len(team[0].params))]
    decay = {"params": 1.0, "exp_avg": cfg.betas[0] ** tau, "exp_avg_sq": cfg.betas[1] ** tau}
    in_flight: list[tuple[int, list, list[dict], list[bool]]] = []  # (lands after, due, snapshots, finite)
    full_round_next = False

    def values(w, what):
        return w.params if what == "params" else w.state[what]

    for s in range(1, n_calls + 1):
        for m, w in enumerate(team):
            ref.adam_update(cfg, w, ref.gradient(cfg, w.params, m, s - 1), cfg.lr_at(s))
        full_now, full_round_next = full_round_next, False  # read before this step's landing
        for landing in [r for r in in_flight if r[0] == s]:
            _, due, snaps, ok = landing
            for what, i in due:
                g = torch.stack([snap[(what, i)] for snap, good in zip(snaps, ok) if good]).mean(dim=0)
                d = decay[what]
                for w, snap, good in zip(team, snaps, ok):
                    new = d * g + (values(w, what)[i] - d * snap[(what, i)]) if good else d * g
                    values(w, what)[i] = new.clamp(min=0) if what == "exp_avg_sq" else new
            if not all(ok) and set(due) != set(everything):
                full_round_next = True  # read at the next step, whose round is the full one
            in_flight.remove(landing)
        due = [(what, i) for what, positions in ref.due_items(cfg, s) for i in positions]
        if full_now:
            due = everything
        if due:
            snaps = [{item: values(w, item[0])[item[1]].clone() for item in due} for w in team]
            ok = [all(bool(torch.isfinite(t).all()) for t in snap.values()) for snap in snaps]
            in_flight.append((s + tau, due, snaps, ok))
        history.append([w.snapshot() for w in team])
    return history


def assert_matches(got: dict, want: dict, where: str) -> None:
    torch.testing.assert_close(got["params"], want["params"], **NAN_TOL, msg=lambda m: f"{where}, params: {m}")
    for key in want["state"]:
        torch.testing.assert_close(got["state"][key], want["state"][key], **NAN_TOL,
                                   msg=lambda m: f"{where}, {key}: {m}")


def finite(snapshot: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*snapshot["params"], *sum(snapshot["state"].values(), [])])


# --------------------------------------------------------------------------- the core on real gloo processes
def _train_core(rank: int, cfg: ref.Config, n_calls: int, mode, comm=None, overlap: int = 0,
                config: DeslocConfig | None = None) -> dict:
    """One rank: the reference model as plain leaf tensors, torch's Adam, the core over the world group
    (or ``comm``: a thread of the fake); ``config`` replaces the one built from ``cfg``, ``mode``, ``overlap``
    (test_nonfinite_combinations.py: groups, the DDP warm-up, ...)."""
    params = [p.clone().requires_grad_(True) for p in ref.start_params(0, cfg.seed)]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if config is None:
        config = DeslocConfig(param_sync_every=cfg.param_sync_every, state_sync_every=cfg.state_sync_every,
                              fragments=cfg.fragments, on_nonfinite=mode, overlap_steps=overlap)
    core = DeslocSync(config, comm=comm if comm is not None else Comm())
    core.setup_groups()  # nothing without group_size
    core.attach([opt])
    history = [{"params": [p.detach().clone() for p in params], "state": {}}]
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning_desloc.nonfinite").addHandler(handler)
    raised = None
    try:
        for call in range(n_calls):
            x, y = ref.make_batch(rank, call, cfg.seed)
            loss = ref.loss_fn(params, x, y)
            if cfg.skips(call, rank):
                loss = loss * math.inf
            opt.zero_grad()
            loss.backward()
            core.average_gradients(opt)  # the DDP warm-up, or inside the groups every step (else nothing)
            index = core.begin_step(opt)
            opt.step()
            try:
                core.after_step(index, opt)
            except FloatingPointError as err:
                raised = (call + 1, str(err))
                break
            history.append({"params": [p.detach().clone() for p in params],
                            "state": {k: [opt.state[p][k].clone() for p in params] for k in ("exp_avg", "exp_avg_sq")}})
    finally:
        logging.getLogger("lightning_desloc.nonfinite").removeHandler(handler)
    return {"history": history, "raised": raised, "messages": messages, "bytes": dict(core.ledger.bytes),
            "rounds": dict(core.ledger.rounds_by_category)}


POISONED = ref.Config("adam", param_sync_every=4, state_sync_every=PERIODS, lr=2e-2,
                      skip_calls=frozenset({7}), skip_ranks=frozenset({2}))  # step 8 on rank 2: a round step
HEALTHY = ref.Config("adam", param_sync_every=4, state_sync_every=PERIODS, lr=2e-2)
N_CALLS = 12
# fragments=2: fragment 0 (offset 0) after steps 4, 8, 12, fragment 1 (offset 2) after 2, 6, 10; step 8's
# round carries fragment 0's parameters only, so rank 2's fragment 1 and its states stay NaN until the full round
FRAGMENTED = ref.Config("adam", param_sync_every=4, state_sync_every=PERIODS, lr=2e-2, fragments=2,
                        skip_calls=frozenset({7}), skip_ranks=frozenset({2}))


def _three_ranks(rank: int, world: int, out: str) -> None:
    runs = {mode: _train_core(rank, POISONED, N_CALLS, mode) for mode in (None, "heal", "raise")}
    runs.update({f"healthy-{mode}": _train_core(rank, HEALTHY, N_CALLS, mode) for mode in (None, "heal")})
    runs.update({f"fragments-{mode}": _train_core(rank, FRAGMENTED, N_CALLS, mode) for mode in ("heal", "raise")})
    torch.save(runs, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite3")
    run_on_processes(_three_ranks, 3, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(3)]


def test_heal_gives_every_rank_the_finite_ranks_mean_then_a_full_round(three_ranks):
    want = simulate(POISONED, N_CALLS, 3, "heal")
    for r, run in enumerate(three_ranks):
        got = run["heal"]["history"]
        assert run["heal"]["raised"] is None and len(got) == N_CALLS + 1
        for call in range(1, N_CALLS + 1):
            assert_matches(got[call], want[call][r], f"rank {r} after step {call}")
        assert finite(got[8]) or r == 2  # step 8's round gave rank 2 the parameters; its states are still NaN
        assert all(finite(got[c]) for c in range(9, N_CALLS + 1)), f"rank {r} not healed by step 9's full round"
    assert not finite(three_ranks[2]["heal"]["history"][8])
    # after step 9's full round every rank holds the same parameters and states
    for key in ("params", "exp_avg", "exp_avg_sq"):
        get = (lambda h: h["params"]) if key == "params" else (lambda h, k=key: h["state"][k])
        assert all(torch.equal(a, b) for r in (1, 2) for a, b in
                   zip(get(three_ranks[0]["heal"]["history"][9]), get(three_ranks[r]["heal"]["history"][9])))
    # rank 0 warns (twice: step 8's round, and step 9's full round, which left rank 2 out again); the others not
    messages = three_ranks[0]["heal"]["messages"]
    assert len(messages) == 2 and all("rank(s) [2] of 3" in m for m in messages)
    assert "after optimizer step 8" in messages[0] and "averages the parameters and every state once more" in messages[0]
    assert "after optimizer step 9" in messages[1] and "they are healed" in messages[1]
    assert three_ranks[1]["heal"]["messages"] == three_ranks[2]["heal"]["messages"] == []
    # rounds: step 4 and 8 (parameters), 9 (everything: the full round), 12 (parameters and exp_avg)
    assert three_ranks[0]["heal"]["rounds"] == {"params": 4, "state/exp_avg": 2, "state/exp_avg_sq": 1, "control": 4}


def test_heal_with_fragments_checks_what_each_fragment_round_carries_then_runs_a_full_round(three_ranks):
    want = simulate(FRAGMENTED, N_CALLS, 3, "heal")
    assert ref.fragment_positions(FRAGMENTED) == [0, 1, 1, 1]  # step 8's round: W1 only
    for r, run in enumerate(three_ranks):
        got = run["fragments-heal"]["history"]
        assert run["fragments-heal"]["raised"] is None and len(got) == N_CALLS + 1
        for call in range(1, N_CALLS + 1):
            assert_matches(got[call], want[call][r], f"rank {r} after step {call}")
        assert all(finite(got[c]) for c in range(9, N_CALLS + 1)), f"rank {r} not healed by step 9's full round"
    rank2 = three_ranks[2]["fragments-heal"]["history"][8]
    assert torch.isfinite(rank2["params"][0]).all() and not torch.isfinite(rank2["params"][1]).all()
    messages = three_ranks[0]["fragments-heal"]["messages"]
    assert len(messages) == 2 and all("rank(s) [2] of 3" in m for m in messages)
    assert "after optimizer step 8" in messages[0] and "averages the parameters and every state once more" in messages[0]
    assert "after optimizer step 9" in messages[1] and "they are healed" in messages[1]
    # rounds: fragment rounds after steps 2, 4, 6, 8, 10, 12, the full round after 9
    assert three_ranks[0]["fragments-heal"]["rounds"]["control"] == 7
    for r, run in enumerate(three_ranks):  # raise: every rank at step 9, the round already left rank 2 out
        step, message = run["fragments-raise"]["raised"]
        assert step == 9 and "rank(s) [2] of 3" in message and "after optimizer step 8" in message, (r, message)
        assert torch.isfinite(run["fragments-raise"]["history"][8]["params"][0]).all()


OVERLAP_CALLS = {1: 14, 2: 18}  # tau = 1: rounds after 4, 8 (rank 2 left out, lands after 9), 10 (full), 12


def _three_ranks_overlapped(rank: int, world: int, out: str) -> None:
    runs = {(tau, mode): _train_core(rank, POISONED, OVERLAP_CALLS[tau], mode, overlap=tau)
            for tau, mode in ((1, "heal"), (1, "raise"), (2, "heal"))}
    torch.save(runs, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def three_ranks_overlapped(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite3overlap")
    run_on_processes(_three_ranks_overlapped, 3, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(3)]


@pytest.mark.parametrize("tau", [1, 2])
def test_overlapped_heal_matches_the_delayed_simulation_after_every_step(three_ranks_overlapped, tau):
    n_calls = OVERLAP_CALLS[tau]
    want = simulate_overlapped_heal(POISONED, n_calls, 3, tau)
    assert not finite(want[8 + tau][2]) and not finite(want[8][2])  # rank 2's states are NaN after the landing
    for r, run in enumerate(three_ranks_overlapped):
        got = run[(tau, "heal")]["history"]
        assert run[(tau, "heal")]["raised"] is None and len(got) == n_calls + 1
        for call in range(1, n_calls + 1):
            assert_matches(got[call], want[call][r], f"tau {tau}, rank {r} after step {call}")
        assert finite(got[n_calls]), f"rank {r} not healed"
        # the landing left rank 2 out: its parameters are the finite ranks' mean of the snapshot (step 8)
        assert torch.isfinite(got[8 + tau]["params"][0]).all()
    if tau == 1:
        messages = three_ranks_overlapped[0][(1, "heal")]["messages"]
        assert len(messages) == 2 and all("rank(s) [2] of 3" in m for m in messages)
        assert "after optimizer step 8" in messages[0] and "once more" in messages[0]
        assert "after optimizer step 10" in messages[1] and "they are healed" in messages[1]
        assert three_ranks_overlapped[1][(1, "heal")]["messages"] == []
        # rounds: 4, 8 (parameters), 10 (the full round, read at the top of step 10), 12 (parameters, exp_avg)
        assert three_ranks_overlapped[0][(1, "heal")]["rounds"] == \
            {"params": 4, "state/exp_avg": 2, "state/exp_avg_sq": 1, "control": 4}


def test_overlapped_raise_stops_every_rank_at_the_same_step(three_ranks_overlapped):
    for r, run in enumerate(three_ranks_overlapped):
        step, message = run[(1, "raise")]["raised"]
        assert step == 10, f"rank {r} raised after step {step}"  # lands after 9, read at the top of 10
        assert "rank(s) [2] of 3" in message and "after optimizer step 8" in message
        assert torch.isfinite(run[(1, "raise")]["history"][9]["params"][0]).all()  # left out at the landing


def test_the_default_lets_a_nan_reach_every_rank(three_ranks):
    want = simulate(POISONED, N_CALLS, 3, None)
    for r, run in enumerate(three_ranks):
        got = run[None]["history"]
        for call in range(1, N_CALLS + 1):
            assert_matches(got[call], want[call][r], f"rank {r} after step {call}")
        assert finite(got[7]) and not torch.isfinite(got[8]["params"][0]).all(), f"rank {r}"
        assert not torch.isfinite(got[N_CALLS]["params"][0]).any()
        assert run[None]["messages"] == []


def test_raise_stops_every_rank_at_the_same_step(three_ranks):
    for r, run in enumerate(three_ranks):
        step, message = run["raise"]["raised"]
        assert step == 9, f"rank {r} raised after step {step}"  # step 8's round, read one step later
        assert "rank(s) [2] of 3" in message and "after optimizer step 8" in message and "params" in message
        assert "Lower the learning rate" in message and "on_nonfinite='heal'" in message
        # the round itself already left rank 2 out: every rank holds the finite ranks' parameters
        assert torch.isfinite(run["raise"]["history"][8]["params"][0]).all()


def test_a_healthy_run_is_bit_identical_and_the_flags_cost_4_bytes_per_rank_per_round(three_ranks):
    for r, run in enumerate(three_ranks):
        guarded, plain = run["healthy-heal"], run["healthy-None"]
        for call, (a, b) in enumerate(zip(guarded["history"], plain["history"])):
            assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), f"rank {r} step {call}"
            for key in b["state"]:
                assert all(torch.equal(x, y) for x, y in zip(a["state"][key], b["state"][key])), (r, call, key)
        rounds = plain["rounds"]["control"]
        assert rounds == 3  # steps 4, 8, 12
        assert plain["bytes"]["control"] == rounds * len(SIGNALS) * FLOAT32
        assert guarded["bytes"]["control"] == rounds * (len(SIGNALS) + 3) * FLOAT32  # + one float per rank
        assert {k: v for k, v in guarded["bytes"].items() if k != "control"} == \
               {k: v for k, v in plain["bytes"].items() if k != "control"}


def _two_ranks_float32(rank: int, world: int, out: str, overlap: int = 0) -> None:
    """A float32 MLP: its parameters share the float32 bucket with the control tensor (which the guard
    lengthens by one float per rank); with two ranks each element's sum is a + b in any order.
    ``overlap``: ``overlap_steps`` (the control tensor is then a bucket of its own)."""
    runs = {}
    for mode in (None, "heal"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        core = DeslocSync(DeslocConfig(param_sync_every=2, state_sync_every=4, on_nonfinite=mode,
                                       overlap_steps=overlap), comm=Comm())
        core.attach([opt])
        g = torch.Generator().manual_seed(rank)
        history = []
        for _ in range(8):
            x = torch.randn(8, 16, generator=g)
            torch.nn.functional.mse_loss(net(x), x[:, :4] * (1 + rank)).backward()
            index = core.begin_step(opt)
            opt.step()
            core.after_step(index, opt)
            opt.zero_grad()
            history.append([p.detach().clone() for p in net.parameters()]
                           + [t.clone() for p in net.parameters() for t in opt.state[p].values() if t.dim()])
        runs[mode] = {"history": history, "bytes": dict(core.ledger.bytes)}
    torch.save(runs, f"{out}/rank{rank}.pt")


def test_a_healthy_float32_run_sharing_the_control_bucket_is_bit_identical(tmp_path):
    run_on_processes(_two_ranks_float32, 2, str(tmp_path))
    for r in range(2):
        runs = torch.load(tmp_path / f"rank{r}.pt")
        for step, (a, b) in enumerate(zip(runs["heal"]["history"], runs[None]["history"]), start=1):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"rank {r} after step {step}"
        assert runs[None]["bytes"]["control"] == 4 * len(SIGNALS) * FLOAT32  # rounds at steps 2, 4, 6, 8
        assert runs["heal"]["bytes"]["control"] == 4 * (len(SIGNALS) + 2) * FLOAT32


def test_a_healthy_overlapped_run_with_the_guard_is_bit_identical(tmp_path):
    run_on_processes(_two_ranks_float32, 2, str(tmp_path), 1)
    for r in range(2):
        runs = torch.load(tmp_path / f"rank{r}.pt")
        for step, (a, b) in enumerate(zip(runs["heal"]["history"], runs[None]["history"]), start=1):
            assert len(a) == len(b) > 4 and all(torch.equal(x, y) for x, y in zip(a, b)), f"rank {r} after step {step}"
        assert runs["heal"]["bytes"]["control"] == 4 * (len(SIGNALS) + 2) * FLOAT32


def test_heal_through_the_fake_comm_matches_the_simulation_too():
    """The single-process fake (threads) masks and rescales as the real round does."""
    runs = run_on_threads(lambda rank, world, comm: _train_core(rank, POISONED, 10, "heal", comm), 3)
    want = simulate(POISONED, 10, 3, "heal")
    for r, run in enumerate(runs):
        for call in range(1, 11):
            assert_matches(run["history"][call], want[call][r], f"rank {r} after step {call}")


def _nan_after_the_last_round(rank: int, world: int, comm, mode: str):
    """K_x = 4, 6 steps, rank 1's last gradient infinite: only the end of fit's consensus round can see it."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    core = DeslocSync(DeslocConfig(param_sync_every=4, state_sync_every=8, on_nonfinite=mode), comm=comm)
    core.attach([opt])
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 7):
        loss = net(torch.randn(4, 3, generator=g)).pow(2).mean()
        (loss * (math.inf if (rank, step) == (1, 6) else 1.0)).backward()
        index = core.begin_step(opt)
        opt.step()
        core.after_step(index, opt)
        opt.zero_grad()
    before = [p.detach().clone() for p in net.parameters()]
    states = [opt.state[p][k].clone() for p in net.parameters() for k in ("exp_avg", "exp_avg_sq")]
    core.reach_consensus(net)
    return before, states, [p.detach().clone() for p in net.parameters()], \
        [opt.state[p][k].clone() for p in net.parameters() for k in ("exp_avg", "exp_avg_sq")]


def test_the_end_of_fit_consensus_is_guarded_too():
    (before0, states0, after0, states_after0), (before1, _, after1, states_after1) = \
        run_on_threads(_nan_after_the_last_round, 2, "heal")
    assert not all(bool(torch.isfinite(p).all()) for p in before1)
    # rank 1 left out of the final average and of the full round after it: rank 0's own values everywhere
    for mine, a, b in zip(before0, after0, after1):
        assert torch.equal(mine, a) and torch.equal(mine, b)
    for mine, a, b in zip(states0, states_after0, states_after1):
        assert torch.equal(mine, a) and torch.equal(mine, b)
    with pytest.raises(FloatingPointError, match=r"rank\(s\) \[1\] of 2 .* after optimizer step 6"):
        run_on_threads(_nan_after_the_last_round, 2, "raise")


def _settled_before_a_save(rank: int, world: int, comm):
    """POISONED up to step 8 (rank 2 left out of its parameter round), then what a save does first."""
    params = [p.clone().requires_grad_(True) for p in ref.start_params(0, POISONED.seed)]
    opt = torch.optim.Adam(params, lr=POISONED.lr)
    core = DeslocSync(DeslocConfig(param_sync_every=4, state_sync_every=PERIODS, on_nonfinite="heal"), comm=comm)
    core.attach([opt])
    for call in range(8):
        x, y = ref.make_batch(rank, call, POISONED.seed)
        loss = ref.loss_fn(params, x, y) * (math.inf if POISONED.skips(call, rank) else 1.0)
        opt.zero_grad()
        loss.backward()
        index = core.begin_step(opt)
        opt.step()
        core.after_step(index, opt)
    core.settle_control()  # checkpoint.save's first call: the full round runs now, not after step 9
    return [t.detach().clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]


def test_a_save_right_after_a_healed_round_saves_healed_states():
    ranks = run_on_threads(_settled_before_a_save, 3)
    assert all(bool(torch.isfinite(t).all()) for t in ranks[2])
    assert all(torch.equal(a, b) for other in ranks[1:] for a, b in zip(ranks[0], other))


def test_one_process_with_a_nan_raises_even_when_healing():
    """No finite rank (the only one is not): nothing to heal from."""
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    core = DeslocSync(DeslocConfig(param_sync_every=1, state_sync_every=1, on_nonfinite="heal"))
    core.attach([opt])
    for step in (1, 2):
        (net(torch.randn(4, 3)).sum() * (math.inf if step == 1 else 1.0)).backward()
        index = core.begin_step(opt)
        opt.step()
        if step == 1:
            core.after_step(index, opt)
        else:
            with pytest.raises(FloatingPointError, match=r"rank\(s\) \[0\] of 1 .* step 1 .* no rank was finite"):
                core.after_step(index, opt)


# --------------------------------------------------------------------------- through the Trainer
class Messages(Callback):
    """Keeps the guard's log messages of this rank in a file at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out = out

    def setup(self, trainer, module, stage):
        self.messages: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("lightning_desloc.nonfinite").addHandler(self.handler)

    def on_fit_end(self, trainer, module):
        torch.save({"messages": self.messages}, f"{self.out}/messages{trainer.global_rank}.pt")


class RaisingMlp(Mlp):
    """Writes down, per rank, the exception its optimizer step raised and the step, then re-raises (a
    callback's ``on_exception`` runs in the launcher's main process only)."""

    out = ""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        except Exception as err:
            torch.save({"exception": (type(err).__name__, str(err)), "global_step": self.trainer.global_step},
                       f"{self.out}/raised{self.global_rank}.pt")
            raise


def fit(out: Path, cfg: ref.Config, n_calls: int, mode: str) -> None:
    strategy = DeslocStrategy(param_sync_every=cfg.param_sync_every, state_sync_every=cfg.state_sync_every,
                              on_nonfinite=mode, start_method=START_METHOD)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_val_batches=0,
                        use_distributed_sampler=False, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[Recorder(str(out)), Messages(str(out))])
    model = Mlp(cfg, n_calls) if mode != "raise" else RaisingMlp(cfg, n_calls)
    model.out = str(out)
    trainer.fit(model)


TWO = ref.Config("adam", param_sync_every=4, state_sync_every=PERIODS, lr=2e-2,
                 skip_calls=frozenset({6}), skip_ranks=frozenset({1}))  # step 7 on rank 1, between rounds


@pytest.mark.timeout(180)
def test_trainer_heal_matches_the_simulation_after_every_step(tmp_path):
    n_calls = 10  # rounds after steps 4, 8 (parameters; rank 1 left out) and 9 (everything)
    fit(tmp_path, TWO, n_calls, "heal")
    want = simulate(TWO, n_calls, 2, "heal")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")["history"]
        for call in range(1, n_calls + 1):
            assert_matches(got[call], want[call][r], f"rank {r} after step {call}")
        assert all(finite(got[c]) for c in (9, 10))
    assert not finite(torch.load(tmp_path / "rank1.pt")["history"][7])
    logs = [torch.load(tmp_path / f"messages{r}.pt") for r in range(2)]
    assert len(logs[0]["messages"]) == 2 and "rank(s) [1] of 2" in logs[0]["messages"][0]
    assert "after optimizer step 8" in logs[0]["messages"][0] and logs[1]["messages"] == []


@pytest.mark.timeout(180)
def test_trainer_raise_ends_every_rank_with_floating_point_error(tmp_path):
    with pytest.raises(Exception, match="FloatingPointError"):
        fit(tmp_path, TWO, 12, "raise")
    ends = [torch.load(tmp_path / f"raised{r}.pt") for r in range(2)]
    for end in ends:
        name, message = end["exception"]
        assert name == "FloatingPointError" and "rank(s) [1] of 2" in message and "step 8" in message
    assert ends[0]["global_step"] == ends[1]["global_step"]  # the same step on both ranks, no rank left waiting


class SaveAt(Callback):
    """Saves a checkpoint ``step{s}.ckpt`` after the optimizer steps in ``steps`` and writes down, per rank,
    an exception the save raised (then re-raises it)."""

    def __init__(self, out: str, steps: tuple[int, ...]) -> None:
        self.out, self.steps = out, steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            try:
                trainer.save_checkpoint(f"{self.out}/step{trainer.global_step}.ckpt")
            except Exception as err:
                torch.save({"exception": (type(err).__name__, str(err)), "global_step": trainer.global_step},
                           f"{self.out}/raised{trainer.global_rank}.pt")
                raise


def fit_with_saves(out: Path, mode: str, n_calls: int) -> None:
    strategy = DeslocStrategy(param_sync_every=TWO.param_sync_every, state_sync_every=TWO.state_sync_every,
                              on_nonfinite=mode, start_method=START_METHOD)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_val_batches=0,
                        use_distributed_sampler=False, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[SaveAt(str(out), (4, 7)), Recorder(str(out))])
    trainer.fit(Mlp(TWO, n_calls))


@pytest.mark.timeout(180)
def test_a_save_after_a_rank_went_non_finite_raises_and_writes_nothing(tmp_path):
    """Rank 1's update 7 is infinite, after the round of step 4 and before the save of step 7: the save's
    check finds it, every rank raises before anything is written, and the checkpoint of step 4 stays."""
    with pytest.raises(Exception, match="FloatingPointError"):
        fit_with_saves(tmp_path, "raise", 10)
    for r in range(2):
        name, message = torch.load(tmp_path / f"raised{r}.pt")["exception"]
        assert name == "FloatingPointError" and "rank(s) [1] of 2" in message, message
        assert "optimizer step 7" in message and "nothing was saved" in message
    assert not list(tmp_path.glob("step7*")), "the save of step 7 left a file"
    good = torch.load(tmp_path / "step4.ckpt", weights_only=False)
    want = simulate(TWO, 4, 2, None)[4][0]["params"]  # after the round of step 4: every rank alike
    torch.testing.assert_close(list(good["state_dict"].values()), want, rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(180)
def test_a_save_after_a_rank_went_non_finite_heals_first_with_heal(tmp_path):
    """The same run with "heal": the save first runs a full round over the finite rank (rank 0), so the
    checkpoint of step 7 holds rank 0's parameters and states, and both ranks go on from them."""
    fit_with_saves(tmp_path, "heal", 8)
    saved = torch.load(tmp_path / "step7.ckpt", weights_only=False)
    want = simulate(TWO, 7, 2, None)[7][0]  # rank 0 after step 7: no round since step 4, nothing NaN yet
    torch.testing.assert_close(list(saved["state_dict"].values()), want["params"], rtol=1e-10, atol=1e-12)
    state = saved["optimizer_states"][0]["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close([state[i][key] for i in sorted(state)], want["state"][key], rtol=1e-10, atol=1e-12)
    runs = [torch.load(tmp_path / f"rank{r}.pt")["history"] for r in range(2)]
    # recorded right after the save (SaveAt runs first): rank 1 was healed with rank 0's values
    assert finite(runs[1][7]) and all(torch.equal(a, b) for a, b in zip(runs[0][7]["params"], runs[1][7]["params"]))
    assert all(finite(run[8]) for run in runs)


class ValidatedMlp(Mlp):
    """Validates on one batch and writes down, per rank, the parameters validation saw."""

    out = ""

    def val_dataloader(self):
        return DataLoader([ref.make_batch(0, 99, self.cfg.seed)], batch_size=None)

    def validation_step(self, batch, batch_idx):
        torch.save({"global_step": self.trainer.global_step, "params": [p.detach().clone() for p in self.parameters()]},
                   f"{self.out}/validated{self.global_rank}.pt")


def fit_with_validation(out: Path, mode: str) -> None:
    """TWO (rank 1's update 7 infinite) with a consensus validation after step 7, between rounds."""
    strategy = DeslocStrategy(param_sync_every=TWO.param_sync_every, state_sync_every=TWO.state_sync_every,
                              on_nonfinite=mode, start_method=START_METHOD)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=7, limit_val_batches=1,
                        num_sanity_val_steps=0, use_distributed_sampler=False, enable_progress_bar=False,
                        logger=False, enable_checkpointing=False, enable_model_summary=False)
    model = ValidatedMlp(TWO, 7)
    model.out = str(out)
    trainer.fit(model)


@pytest.mark.timeout(180)
def test_consensus_validation_after_a_rank_went_non_finite_raises_or_validates_the_finite_mean(tmp_path):
    """Validation after step 7 averages the parameters: "raise" stops every rank before that average,
    "heal" validates the finite rank's parameters (rank 0's after step 7, from the simulator)."""
    with pytest.raises(Exception, match="FloatingPointError"):
        fit_with_validation(tmp_path, "raise")
    assert not list(tmp_path.glob("validated*"))
    fit_with_validation(tmp_path, "heal")
    want = simulate(TWO, 7, 2, None)[7][0]["params"]  # rank 0 after step 7: no round since step 4
    for r in range(2):
        seen = torch.load(tmp_path / f"validated{r}.pt")
        assert seen["global_step"] == 7
        torch.testing.assert_close(seen["params"], want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("others, policy, per_slot", [
    (dict(compression="bf16"), "average", 1),
    (dict(outer_lr=0.7), "average", 1),
    (dict(max_drift=0.1), "average", 1),
    (dict(param_sync_every="auto", state_sync_every=None), "average", 1),
    (dict(state_policy="reset", state_sync_every=None), "reset", 1),
    (dict(state_policy="keep_local", state_sync_every=None), "keep_local", 1),
    (dict(ddp_warmup_steps=3), "average", 1),
    (dict(group_size=2), "average", 2),
    (dict(group_size=3, shard_within_group=True), "average", 3),
])
def test_the_guard_is_built_with_every_other_mechanism(others, policy, per_slot):
    """Each combination that used to be refused builds a guard that knows the state policy (how it heals)
    and how many ranks stand behind one slot (a group's, with group_size); what it does is checked on real
    processes in test_nonfinite_combinations.py."""
    arguments = dict(param_sync_every=4, state_sync_every=8, on_nonfinite="heal")
    arguments.update(others)
    guard = DeslocSync(DeslocConfig.from_arguments(**arguments)).options[0]
    assert isinstance(guard, NonfiniteGuard)
    assert (guard.mode, guard.state_policy, guard.ranks_per_slot) == ("heal", policy, per_slot)


def test_config_values_and_signatures():
    with pytest.raises(ValueError, match="on_nonfinite must be None, 'heal' or 'raise', got 'skip'"):
        DeslocConfig(on_nonfinite="skip")
    assert DeslocConfig().on_nonfinite == "raise"  # the default: no rank ever holds a NaN from another
    assert DeslocStrategy().config.on_nonfinite == "raise" and DeslocFabricStrategy().core.config.on_nonfinite == "raise"
    assert DeslocStrategy(on_nonfinite="raise").config.on_nonfinite == "raise"
    assert DeslocFabricStrategy(on_nonfinite="heal").core.config.on_nonfinite == "heal"
    assert "on_nonfinite" in ARGUMENT_DOCS and "on_nonfinite:" in (DeslocStrategy.__doc__ or "")
    assert DeslocSync(DeslocConfig(on_nonfinite=None)).options == []  # None: no guard, nothing extra in any round
