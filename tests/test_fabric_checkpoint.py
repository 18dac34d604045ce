"""Fabric gets the Trainer's checkpoints: ``fabric.save`` writes the consensus main file and one shard per
rank, ``fabric.load`` resumes each rank's own state (same world size) or every rank from the consensus
(another world size). Real 2-process Fabric runs over gloo; the expectations are an uninterrupted run
of the same training and the mean of the shards, computed here."""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch

import reference as ref
from lightning_desloc import DeslocFabricStrategy
from helpers import START_METHOD

OPTIONS = dict(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12}, outer_lr=0.7,
               compression={"params": "int8"})
STEPS, SAVE_AT = 10, 5  # step 5 lies between parameter averages (3, 6, 9): the ranks differ there

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def train(fabric: L.Fabric, out_dir: str, resume_from: str | None) -> None:
    rank = fabric.global_rank
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(ref.IN, ref.HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(ref.HIDDEN, ref.OUT)).double()
    model, optimizer = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=2e-2))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    start = 0
    if resume_from is not None:
        rest = fabric.load(resume_from, state)
        start = state["step"]
        assert rest == {}, rest
    steps = {}
    after_load = [p.detach().clone() for p in net.parameters()]
    for call in range(start, STEPS):
        x, y = ref.make_batch(rank, call)
        fabric.backward(torch.nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        steps[call + 1] = [p.detach().clone() for p in net.parameters()]
        if call + 1 == SAVE_AT and resume_from is None:
            state["step"] = SAVE_AT
            fabric.save(os.path.join(out_dir, "ck.pt"), state)
    strategy = fabric.strategy
    decision = strategy.resume_decision
    torch.save({"steps": steps, "after_load": after_load, "optimizer_steps": list(strategy.optimizer_steps),
                "path": decision.path if decision is not None else None},
               os.path.join(out_dir, f"rank{rank}.pt"))


def run(out_dir, devices=2, resume_from=None) -> list[dict]:
    os.makedirs(out_dir, exist_ok=True)
    fabric = L.Fabric(accelerator="cpu", devices=devices, strategy=DeslocFabricStrategy(**OPTIONS, start_method=START_METHOD))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fabric.launch(train, str(out_dir), resume_from)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(devices)]


def test_fabric_save_writes_shards_and_load_resumes_bit_for_bit_or_from_the_consensus(tmp_path):
    straight = run(tmp_path / "straight")
    path = str(tmp_path / "straight" / "ck.pt")
    main = torch.load(path, weights_only=True)
    shards = sorted((tmp_path / "straight" / "ck.pt.shards").glob("*/rank-*.pt"))
    assert len(shards) == 2 and main["desloc"]["world_size"] == 2 and main["step"] == SAVE_AT
    own = [torch.load(s, weights_only=True) for s in shards]
    # each shard is that rank's model at step 5; the main file is their mean (the ranks differ there)
    for r in range(2):
        got = [own[r]["model"][k] for k in sorted(own[r]["model"])]
        want = straight[r]["steps"][SAVE_AT]
        names = [n for n, _ in torch.nn.Sequential(torch.nn.Linear(ref.IN, ref.HIDDEN), torch.nn.Tanh(),
                                                     torch.nn.Linear(ref.HIDDEN, ref.OUT)).named_parameters()]
        assert sorted(names) == sorted(own[r]["model"])
        assert all(torch.equal(own[r]["model"][n], w) for n, w in zip(names, want)), r
        assert got
    assert not torch.equal(own[0]["model"]["0.weight"], own[1]["model"]["0.weight"])
    # with outer_lr the main file's parameters are what reach_consensus would leave: the outer Nesterov
    # step (torch's SGD equations, lr 0.7, momentum 0.9) from the global parameters and momentum of the
    # last average (step 3, in the main file) on the mean of the shards. To 1e-12 relative, not bitwise:
    # these formulas round 0.9 * b and 0.7 * (...) on their own where torch's add(alpha=...) fuses them
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    mean = torch.cat([((own[0]["model"][n] + own[1]["model"][n]) / 2).reshape(-1) for n in names])
    x_old = main["desloc"]["core"]["snapshot"]["flat"]
    b_old = main["desloc"]["core"]["options"]["outer"]["momentum_buffer"]
    g = x_old - mean
    b = 0.9 * b_old + g
    x_new = x_old - 0.7 * (g + 0.9 * b)
    torch.testing.assert_close(torch.cat([main["model"][n].reshape(-1) for n in names]), x_new, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(x_new, mean)
    sq = [o["optimizer"]["state"][0]["exp_avg_sq"] for o in own]
    assert torch.equal(main["optimizer"]["state"][0]["exp_avg_sq"], (sq[0] + sq[1]) / 2)

    # same world size: the local path continues the uninterrupted run bit for bit (outer momentum,
    # int8 residuals and the snapshot come back too, else the averages after step 5 would differ)
    resumed = run(tmp_path / "resumed", resume_from=path)
    for r in range(2):
        assert resumed[r]["path"] == "local"
        assert resumed[r]["optimizer_steps"] == straight[r]["optimizer_steps"] == [STEPS]
        for step in range(SAVE_AT + 1, STEPS + 1):
            assert all(torch.equal(a, b) for a, b in zip(resumed[r]["steps"][step], straight[r]["steps"][step])), (r, step)

    # one rank: the consensus path starts from the main file's mean
    alone = run(tmp_path / "alone", devices=1, resume_from=path)
    assert alone[0]["path"] == "consensus"
    assert all(torch.equal(p, main["model"][n]) for p, n in zip(alone[0]["after_load"], names))
