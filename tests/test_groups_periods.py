"""Hierarchical groups with their own periods (``group_param_sync_every > 1``): DES-LOC inside the groups
and DES-LOC across them, on 4 real processes in 2 groups, against ``reference.simulate_two_level``.

The periods (steps ``s = 1..13``)::

    params        inner k_in = 2      (2, 4, 6, 8, 10, 12)   outer K_x = 3   (3, 6, 9, 12)
    exp_avg       inner 3 k_in = 6    (6, 12)                outer 4         (4, 8, 12)
    exp_avg_sq    inner 6 k_in = 12   (12)                   outer 9         (9)

so there are inner-only steps (2, 10), outer-only steps for every category (params 3 and 9, exp_avg 4
and 8, exp_avg_sq 9), steps where both levels are due (params 6 and 12, exp_avg 12), a step where the
levels have different categories due (4: params inside, exp_avg across), and a last step (13) after
which the end of training averages the parameters at both levels. The inner state periods are the
default rule (``group_state_sync_every=None``).
"""

from __future__ import annotations

import threading
import warnings

import lightning as L
import pytest
import torch

import reference as ref
from lightning_desloc import DeslocStrategy
from lightning_desloc.groups import check_group_keys, make_group_schedule
from helpers import START_METHOD, Mlp, Recorder

WORLD, GROUP = 4, 2
N_CALLS = 13
K_IN, K_X = 2, 3
OUTER_STATES = {"exp_avg": 4, "exp_avg_sq": 9}
INNER_STATES = {"exp_avg": 3 * K_IN, "exp_avg_sq": 6 * K_IN}  # the documented default rule, written out

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_two_level_fit(tmp_path):
    cfg = ref.Config("adam", param_sync_every=K_X, state_sync_every=OUTER_STATES, lr=2e-2)
    strategy = DeslocStrategy(param_sync_every=K_X, state_sync_every=OUTER_STATES, group_size=GROUP,
                              group_param_sync_every=K_IN, start_method=START_METHOD)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=1, limit_val_batches=0,
        use_distributed_sampler=False, enable_progress_bar=False, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[Recorder(str(tmp_path))],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Mlp(cfg, N_CALLS).double())
    return cfg, strategy, [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def same(a: dict, b: dict, what: str) -> bool:
    xs, ys = (a["params"], b["params"]) if what == "params" else (a["state"][what], b["state"][what])
    return all(torch.allclose(x, y, rtol=1e-12, atol=1e-14) for x, y in zip(xs, ys))


def test_two_levels_match_the_reference_step_by_step(tmp_path):
    cfg, strategy, ranks = run_two_level_fit(tmp_path)
    history = ref.simulate_two_level(cfg, N_CALLS, GROUP, K_IN, INNER_STATES, workers=WORLD,
                                     init=ref.start_params(0, cfg.seed))

    for r in range(WORLD):
        assert ranks[r]["optimizer_steps"] == [N_CALLS]
        assert len(ranks[r]["history"]) == N_CALLS + 1
        for s, (got, want) in enumerate(zip(ranks[r]["history"], history)):
            ref.assert_snapshot_matches(got, want[r], f"rank {r} after step {s}")

    # the reference itself is not vacuous: who agrees with whom after each step
    for s, snaps in enumerate(history[1:], start=1):
        for what, inner, outer in (("params", K_IN, K_X),
                                   *((k, INNER_STATES[k], OUTER_STATES[k]) for k in OUTER_STATES)):
            in_group = same(snaps[0], snaps[1], what) and same(snaps[2], snaps[3], what)
            world = in_group and same(snaps[0], snaps[2], what)
            assert in_group == (s % inner == 0 or s % outer == 0), (s, what)
            assert world == (s % outer == 0), (s, what)

    # every rank ends fit with the world mean of the last local parameters (step 13 averaged nothing)
    expected_final = ref.consensus(history[-1])
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["final"], expected_final, **ref.SNAPSHOT_TOL)
    assert not torch.allclose(history[-1][0]["params"][0], expected_final[0])

    # bytes per level, by hand: rounds x numel x 8 (float64), one coalesced round per level and step
    model = ref.N_PARAMS * 8
    # inner: params after 2, 3, 4, 6, 8, 9, 10, 12 and at the end (9); exp_avg after 4, 6, 8, 12 (4);
    # exp_avg_sq after 9, 12 (2); no gradient is all-reduced
    # and the inner round of each step with an outer round (3, 4, 6, 8, 9, 12) and of the closing round
    # carries the control tensor: the signal and on_nonfinite's flag per group (3 float32)
    assert dict(strategy.group_ledger.bytes) == {
        "params": 9 * model, "state/exp_avg": 4 * model, "state/exp_avg_sq": 2 * model,
        "control": 7 * (1 + 2) * 4,
    }
    assert strategy.group_ledger.rounds == 9  # steps 2, 3, 4, 6, 8, 9, 10, 12 and the end
    # outer: params after 3, 6, 9, 12 and at the end (5); exp_avg after 4, 8, 12 (3); exp_avg_sq after 9 (1)
    assert strategy.ledger.bytes["params"] == 5 * model
    assert strategy.ledger.bytes["state/exp_avg"] == 3 * model
    assert strategy.ledger.bytes["state/exp_avg_sq"] == 1 * model
    assert strategy.ledger.bytes["setup"] == model
    sync_rounds = {k: v for k, v in strategy.ledger.rounds_by_category.items() if k.startswith(("params", "state/"))}
    assert sync_rounds == {"params": 5, "state/exp_avg": 3, "state/exp_avg_sq": 1}
    assert "grads" not in strategy.ledger.bytes


def test_group_period_defaults_and_validation():
    # the default is today's behaviour: gradients all-reduced inside the groups, no inner schedule
    assert DeslocStrategy(group_size=2).group_schedule is None
    assert DeslocStrategy(group_size=2, group_param_sync_every=1).group_schedule is None
    assert DeslocStrategy().group_schedule is None
    inner = DeslocStrategy(group_size=2, group_param_sync_every=4, param_sync_every=16).group_schedule
    assert inner.param_sync_every == 4
    assert (inner.state_sync_every["exp_avg"], inner.state_sync_every["exp_avg_sq"]) == (12, 24)
    inner = DeslocStrategy(group_size=2, group_param_sync_every=4, group_state_sync_every=8).group_schedule
    assert (inner.state_sync_every["exp_avg"], inner.state_sync_every["exp_avg_sq"]) == (8, 8)
    inner = DeslocStrategy(group_size=2, group_param_sync_every=4, group_state_sync_every={"exp_avg": 4}).group_schedule
    assert (inner.state_sync_every["exp_avg"], inner.state_sync_every["exp_avg_sq"]) == (4, 24)

    bad = [
        (dict(group_size=2, group_param_sync_every=0), r"group_param_sync_every must be a positive integer"),
        (dict(group_size=2, group_param_sync_every=2.0), r"group_param_sync_every must be a positive integer"),
        (dict(group_size=2, group_param_sync_every=True), r"group_param_sync_every must be a positive integer"),
        (dict(group_param_sync_every=4), r"group_size is None.*Set group_size"),
        (dict(group_state_sync_every=8), r"group_size is None.*Set group_size"),
        (dict(group_size=2, group_state_sync_every=8), r"needs group_param_sync_every > 1"),
        (dict(group_size=2, group_param_sync_every=2, state_policy="reset"),
         r"does not support state_policy='reset' \(use state_policy='average'\)"),
        (dict(group_size=2, group_param_sync_every=2, state_policy="keep_local"),
         r"does not support state_policy='keep_local'"),
        (dict(group_size=2, group_param_sync_every=2, param_sync_every="auto"),
         r"does not support param_sync_every='auto' \(give param_sync_every as an int\)"),
        (dict(group_size=2, group_param_sync_every=2, max_drift=1e-3), r"does not support max_drift"),
        (dict(group_size=2, group_param_sync_every=2, group_state_sync_every=0),
         r"^group_state_sync_every must be a positive integer.*Pass e\.g\. group_state_sync_every=256"),
        (dict(group_size=2, group_param_sync_every=2, group_state_sync_every={"exp_avg": -1}),
         r"^group_state_sync_every\['exp_avg'\] must be a positive integer"),
        (dict(group_size=2, group_param_sync_every=2, group_state_sync_every={"step": 4}),
         r"^group_state_sync_every\['step'\]: 'step' is a counter"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            DeslocStrategy(**kwargs)

    # an optimizer state without an inner period fails at the first step, naming the inner option
    with pytest.raises(ValueError, match=r"DeslocStrategy\(group_state_sync_every=\{'row_var': 12\}\)"):  # 6 * k_in
        check_group_keys(make_group_schedule(2, 2), ["exp_avg", "row_var"])
    check_group_keys(make_group_schedule(2, 2, 5), ["exp_avg", "row_var"])  # an int covers every key


# --------------------------------------------------------------------------- the core alone, compressed
_init = threading.Lock()  # the ranks are threads of this process (fake Comm) and share torch's RNG


def _compressed_worker(rank, world, comm, out_dir):
    from lightning_desloc.config import DeslocConfig
    from lightning_desloc.sync import DeslocSync

    with _init:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = torch.nn.Linear(5, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    core = DeslocSync(DeslocConfig.from_arguments(
        param_sync_every=K_X, state_sync_every=OUTER_STATES, group_size=GROUP, group_param_sync_every=K_IN,
        compression="bf16", outer_lr=0.7, outer_momentum=0.9), comm=comm)
    core.setup_groups()
    core.attach([opt])
    g = torch.Generator().manual_seed(rank)
    records = []
    for _ in range(9):
        x = torch.randn(8, 5, generator=g)
        torch.nn.functional.mse_loss(model(x), (1 + rank) * x[:, :3]).backward()
        i = core.begin_step(opt)
        opt.step()
        plan = core.after_step(i, opt)
        opt.zero_grad()
        params = list(model.parameters())
        records.append({
            "plan": plan, "group_plan": core.group_level.last_plan,
            "params": torch.cat([p.detach().reshape(-1) for p in params]),
            **{k: torch.cat([opt.state[p][k].reshape(-1) for p in params]) for k in OUTER_STATES},
        })
    ledgers = {"ledger": core.ledger.state_dict(), "group_ledger": core.group_level.ledger.state_dict()}
    # a direct call of sync() (no after_step) still averages within the group first: the world mean
    from lightning_desloc.schedule import SyncPlan

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * (rank + 1))
    core.sync(opt, SyncPlan(10, params=True))
    direct = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save({"records": records, **ledgers, "direct": direct, "direct_group_plan": core.group_level.last_plan,
                "group_ledger_after": core.group_level.ledger.state_dict()}, f"{out_dir}/core{rank}.pt")


def test_inner_level_with_compression_and_outer_optimizer_on_the_outer_round(tmp_path):
    from fake_comm import run_on_threads
    from lightning_desloc.schedule import SyncPlan

    run_on_threads(_compressed_worker, WORLD, str(tmp_path))
    out = [torch.load(tmp_path / f"core{r}.pt", weights_only=False) for r in range(WORLD)]
    for s in range(1, 10):
        recs = [o["records"][s - 1] for o in out]
        for what, inner, outer in (("params", K_IN, K_X), *((k, INNER_STATES[k], OUTER_STATES[k]) for k in OUTER_STATES)):
            in_group = torch.equal(recs[0][what], recs[1][what]) and torch.equal(recs[2][what], recs[3][what])
            world = in_group and torch.equal(recs[0][what], recs[2][what])
            assert in_group == (s % inner == 0 or s % outer == 0), (s, what)
            assert world == (s % outer == 0), (s, what)  # bit-identical everywhere after the outer round
    # what after_step returns (the outer plan) and what the inner round averaged, for rank 0
    plans = [(r["plan"], r["group_plan"]) for r in out[0]["records"]]
    assert plans[0] == (None, None)
    assert plans[1] == (None, SyncPlan(2, params=True))
    assert plans[2] == (SyncPlan(3, params=True), SyncPlan(3, params=True))
    assert plans[3] == (SyncPlan(4, params=False, states=("exp_avg",)), SyncPlan(4, params=True, states=("exp_avg",)))
    assert plans[8] == (SyncPlan(9, params=True, states=("exp_avg_sq",)),) * 2
    # bytes: inner rounds exact float32, outer rounds bf16 (2 bytes per element); 18 parameters
    n = 5 * 3 + 3
    inner, outer = out[0]["group_ledger"], out[0]["ledger"]
    # inner: params after 2, 3, 4, 6, 8, 9; exp_avg after 4, 6, 8; exp_avg_sq after 9
    # plus the signals on the inner rounds of the steps with an outer round: 3, 4, 6, 8, 9
    assert inner["bytes"] == {"params": 6 * n * 4, "state/exp_avg": 3 * n * 4, "state/exp_avg_sq": 1 * n * 4,
                              "control": 5 * (1 + 2) * 4}  # the signal and a flag per group
    assert inner["rounds"] == 6
    # outer: params after 3, 6, 9; exp_avg after 4, 8; exp_avg_sq after 9
    assert outer["bytes"] == {"params": 3 * n * 2, "state/exp_avg": 2 * n * 2, "state/exp_avg_sq": 1 * n * 2,
                              "control": 5 * (1 + 2) * 4}  # the control tensor stays exact
    assert outer["rounds"] == 5
    # the direct sync: one inner round of the parameters, then every rank holds the same parameters
    assert all(torch.equal(o["direct"], out[0]["direct"]) for o in out)
    assert out[0]["direct_group_plan"] == SyncPlan(10, params=True)
    assert out[0]["group_ledger_after"]["bytes"]["params"] == 7 * n * 4
