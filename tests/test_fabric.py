"""DeslocFabricStrategy on real 2-process Fabric runs over gloo, against the simulator in ``reference.py``.

Each case launches ``Fabric(accelerator="cpu", devices=2, strategy=...)`` with ``fabric.launch(train, ...)``
(spawn). Every worker starts from its own perturbed weights (the strategy's broadcast at
``fabric.setup`` must replace them by rank 0's), trains on rank-dependent batches in float64, records
its parameters and optimizer states after every optimizer step, calls a few Fabric collectives, ends
with ``strategy.reach_consensus()`` and counts every byte it hands to ``torch.distributed`` itself.
The pytest process compares all of it with ``reference.simulate`` for M = 2 workers and with the bytes
the schedule implies.
"""

from __future__ import annotations

import math
import pickle
import warnings
from contextlib import nullcontext

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.precision import MixedPrecision

import reference as ref
from lightning_desloc import DeslocFabricStrategy
from helpers import START_METHOD

WORLD = 2
BROADCAST_OBJ = {"run": "fabric", "payload": list(range(5))}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class ScaledFloat64(MixedPrecision):
    """fp16 loss scaling with a real ``GradScaler`` but no autocast and no input casts, so float64
    gradients stay exact (the scale is a power of two) while inf gradients make the scaler skip steps."""

    def forward_context(self):
        return nullcontext()

    def convert_input(self, data):
        return data

    def convert_output(self, data):
        return data


# --------------------------------------------------------------------------- what runs in the workers
def make_net(rank: int, seed: int) -> torch.nn.Module:
    """``reference.forward``'s MLP with rank ``rank``'s perturbed initial weights."""
    net = torch.nn.Sequential(torch.nn.Linear(ref.IN, ref.HIDDEN), torch.nn.Tanh(), torch.nn.Linear(ref.HIDDEN, ref.OUT))
    net = net.double()
    with torch.no_grad():
        for p, value in zip(net.parameters(), ref.start_params(rank, seed)):
            p.copy_(value)
    return net


def make_optimizer(cfg: ref.Config, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def count_bytes_sent() -> dict[str, int]:
    """Wrap ``torch.distributed.all_reduce`` and ``broadcast`` in this process; returns the live counts."""
    sent = {"all_reduce": 0, "broadcast": 0}
    for name in sent:
        real = getattr(dist, name)

        def counting(tensor, *args, _real=real, _name=name, **kwargs):
            sent[_name] += tensor.numel() * tensor.element_size()
            return _real(tensor, *args, **kwargs)

        setattr(dist, name, counting)
    return sent


def snapshot(params, optimizer) -> dict:
    state = optimizer.state
    keys = sorted({k for p in params for k in state.get(p, {})} - {"step"})
    steps = {int(state[p]["step"]) for p in params if "step" in state.get(p, {})}
    return {
        "params": [p.detach().clone() for p in params],
        "state": {k: [state[p][k].detach().clone() for p in params] for k in keys},
        "step": steps.pop() if len(steps) == 1 else (None if not steps else sorted(steps)),
    }


def train(fabric: L.Fabric, cfg: ref.Config, n_calls: int, out_dir: str) -> None:
    rank = fabric.global_rank
    sent = count_bytes_sent()
    net = make_net(rank, cfg.seed)
    perturbed = [p.detach().clone() for p in net.parameters()]
    model, optimizer = fabric.setup(net, make_optimizer(cfg, net.parameters()))
    logged: list[tuple[int, float]] = []
    fabric.strategy.log_comm_with(lambda metrics, step: logged.append((step, metrics.get("comm/bytes/params", 0.0))))
    params = list(net.parameters())
    history = [snapshot(params, optimizer.optimizer)]
    for call in range(n_calls):
        for j in range(cfg.accumulate):
            x, y = ref.make_batch(rank, call * cfg.accumulate + j, cfg.seed)
            with fabric.no_backward_sync(model, enabled=j < cfg.accumulate - 1):
                loss = torch.nn.functional.mse_loss(model(x), y)
                if cfg.skips(call, rank):
                    loss = loss * math.inf
                fabric.backward(loss / cfg.accumulate)
        if cfg.clip_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=cfg.clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        history.append(snapshot(params, optimizer.optimizer))
    strategy = fabric.strategy
    last_local = [p.detach().clone() for p in params]
    # Fabric's collectives, metered by the strategy: 8 bytes of metrics, 8 + pickle bytes of control
    total = fabric.all_reduce(torch.tensor(float(rank), dtype=torch.float64), reduce_op="sum")
    decision = strategy.reduce_boolean_decision(rank == 0, all=False)
    fabric.barrier()
    received = fabric.broadcast(BROADCAST_OBJ if rank == 0 else None)
    ran_final_round = strategy.reach_consensus()
    torch.save(
        {
            "perturbed": perturbed,
            "history": history,
            "last_local": last_local,
            "final": [p.detach().clone() for p in params],
            "optimizer_steps": list(strategy.optimizer_steps),
            "ledger": strategy.ledger.state_dict(),
            "sent": dict(sent),
            "collectives": (float(total), decision, received),
            "ran_final_round": ran_final_round,
            "logged": logged,
            "strategy_type": type(strategy).__name__,
        },
        f"{out_dir}/rank{rank}.pt",
    )


# --------------------------------------------------------------------------- the cases
ADAM_PERIODS = {"exp_avg": 4, "exp_avg_sq": 6}
SGD_PERIODS = {"momentum_buffer": 5}
CASES = {
    # name: (reference config, optimizer-step calls, strategy: a registered name or DeslocFabricStrategy kwargs)
    "adam": (ref.Config("adam", param_sync_every=3, state_sync_every=ADAM_PERIODS, lr=2e-2), 14,
             dict(param_sync_every=3, state_sync_every=ADAM_PERIODS)),
    "sgd-momentum-accumulate-clip": (
        ref.Config("sgd", param_sync_every=3, state_sync_every=SGD_PERIODS, lr=5e-2, momentum=0.9, dampening=0.1,
                   weight_decay=0.01, accumulate=2, clip_norm=1.2),
        16, dict(param_sync_every=3, state_sync_every=SGD_PERIODS),
    ),
    # state_sync_every=None gives 3*K_x and 6*K_x; calls 2 and 5 have inf gradients, the scaler skips them
    "adamw-defaults-amp-skipped-steps": (
        ref.Config("adamw", param_sync_every=2, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12}, lr=2e-2,
                   weight_decay=0.1, skip_calls=frozenset({2, 5})),
        13, dict(param_sync_every=2),
    ),
    # by string: the paper defaults K_x=256, so nothing is averaged in 6 steps until reach_consensus
    "string-desloc_spawn": (
        ref.Config("adam", param_sync_every=256, state_sync_every={"exp_avg": 768, "exp_avg_sq": 1536}, lr=2e-2),
        6, "desloc_spawn",
    ),
}


def run(tmp_path, cfg: ref.Config, n_calls: int, spec) -> list[dict]:
    strategy = spec if isinstance(spec, str) else DeslocFabricStrategy(**spec, start_method=START_METHOD)
    plugins = [ScaledFloat64("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if cfg.skip_calls else None
    fabric = L.Fabric(accelerator="cpu", devices=WORLD, strategy=strategy, plugins=plugins)
    assert isinstance(fabric.strategy, DeslocFabricStrategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fabric.launch(train, cfg, n_calls, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_fabric_matches_the_reference_and_the_schedule_bytes(tmp_path, name):
    cfg, n_calls, spec = CASES[name]
    ranks = run(tmp_path, cfg, n_calls, spec)
    history = ref.simulate(cfg, n_calls, workers=WORLD, init=ref.start_params(0, cfg.seed))
    n_steps = ref.optimizer_steps(cfg, n_calls)

    # rank-dependent initial weights, fixed by the broadcast at fabric.setup
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["perturbed"], ref.start_params(r, cfg.seed), rtol=0, atol=0)
    assert not torch.equal(ranks[0]["perturbed"][0], ranks[1]["perturbed"][0])

    # every step of every rank equals the reference
    for r in range(WORLD):
        assert ranks[r]["strategy_type"] == "DeslocFabricStrategy"
        assert ranks[r]["optimizer_steps"] == [n_steps]
        assert len(ranks[r]["history"]) == n_calls + 1
        for call, (got, want) in enumerate(zip(ranks[r]["history"], history)):
            ref.assert_snapshot_matches(got, want[r], f"{name}: rank {r} after optimizer-step call {call}")
    assert not torch.allclose(ranks[0]["history"][1]["params"][0], ranks[1]["history"][1]["params"][0])

    # reach_consensus: the mean of the last local parameters, a round only when the last step did not sync
    last_was_sync = n_steps % cfg.param_sync_every == 0
    expected_final = ref.consensus(history[-1])
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["last_local"], history[-1][r]["params"], **ref.SNAPSHOT_TOL)
        torch.testing.assert_close(ranks[r]["final"], expected_final, **ref.SNAPSHOT_TOL)
        assert ranks[r]["ran_final_round"] == (not last_was_sync)
        assert ranks[r]["collectives"] == (1.0, True, BROADCAST_OBJ)

    # bytes: the ledger equals the schedule, and what the workers handed to torch.distributed equals the ledger
    model_bytes = ref.N_PARAMS * 8
    schedule = {"params": (n_steps // cfg.param_sync_every + (not last_was_sync)) * model_bytes}
    for key in cfg.state_keys():
        if n_steps // cfg.state_sync_every[key]:
            schedule[f"state/{key}"] = n_steps // cfg.state_sync_every[key] * model_bytes
    broadcast_bytes = 8 + len(pickle.dumps(BROADCAST_OBJ))
    # every scheduled round also carries the core's control tensor: one float32 signal and on_nonfinite's
    # flag per rank; so does the closing round, a guarded round too
    rounds = sum(1 for s in range(1, n_steps + 1) if s % cfg.param_sync_every == 0
                 or any(s % p == 0 for p in cfg.state_sync_every.values()))
    signal_bytes = 4 * (1 + WORLD) * (rounds + (not last_was_sync))
    expected = {**schedule, "setup": model_bytes, "metrics": 8, "control": 8 + broadcast_bytes + signal_bytes}
    for r in range(WORLD):
        ledger = ranks[r]["ledger"]
        assert ledger["bytes"] == expected, f"rank {r}"
        assert ledger["ddp_equivalent_bytes"] == n_steps * model_bytes
        sent = ranks[r]["sent"]
        assert sent["all_reduce"] == sum(schedule.values()) + signal_bytes + 8 + 8  # schedule, metrics, decision
        assert sent["broadcast"] == model_bytes + broadcast_bytes

    # log_comm_with: one call per round at the step it followed, with the params bytes sent so far
    periods = [cfg.param_sync_every, *(cfg.state_sync_every[k] for k in cfg.state_keys())]
    rounds = [s for s in range(1, n_steps + 1) if any(s % k == 0 for k in periods)]
    want = [(s, float(s // cfg.param_sync_every * model_bytes)) for s in rounds]
    if not last_was_sync:
        want.append((n_steps, float(schedule["params"])))
    for r in range(WORLD):
        assert ranks[r]["logged"] == want, f"rank {r}"


def test_fabric_registry_and_arguments():
    import importlib

    import lightning_desloc

    importlib.reload(lightning_desloc)  # importing twice must not raise
    for name, start_method in (("desloc", "popen"), ("desloc_spawn", "spawn"), ("desloc_fork", "fork")):
        fabric = L.Fabric(accelerator="cpu", devices=2, strategy=name)
        assert isinstance(fabric.strategy, lightning_desloc.DeslocFabricStrategy)
        assert fabric.strategy._start_method == start_method
        assert fabric.strategy.schedule.param_sync_every == 256
        assert fabric.strategy.schedule.state_sync_every["exp_avg_sq"] == 1536
    strategy = DeslocFabricStrategy(param_sync_every=8, state_sync_every={"exp_avg": 16})
    assert strategy.schedule.period_of("exp_avg") == 16 and strategy.schedule.period_of("exp_avg_sq") == 48
    with pytest.raises(ValueError, match="param_sync_every must be a positive integer"):
        DeslocFabricStrategy(param_sync_every=0)
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive"):
        DeslocFabricStrategy(bucket_cap_mb=0)
