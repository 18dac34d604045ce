"""DES-LOC fits on the GPU: two ranks sharing one device under ``cuda:gloo`` (CPU tensors in a collective
fail, as under NCCL), and two devices under NCCL where there are two.

Expectations are counted from the schedule and the model's size (``N_PARAMS`` float32 elements), not read
from the package: a round after step ``s`` averages the parameters when ``s % K_x == 0`` and each Adam
moment on its own period.
"""

import json
import os

import pytest
import torch

from gpu_harness import (
    MODE,
    ONE_DEVICE_BACKEND,
    SHARED_DEVICE,
    assert_schedule_rounds,
    assert_trained_on,
    launch,
    launch_multi_device,
    mean_over_ranks,
    model_bytes,
)

P4 = model_bytes(4)  # one float32 copy of the parameters, bytes
P8 = model_bytes(8)  # float64


def expected_fit_ledger():
    """The ``fit`` scenario: 8 steps, K_x=2, exp_avg every 4, exp_avg_sq every 8; validation after steps
    3 (ranks differ: one consensus round) and 6 (just averaged: none); ModelCheckpoint after steps 4 and 8:
    a save sends only what differs between ranks, so after step 4 (parameters and exp_avg just averaged)
    exp_avg_sq alone, after step 8 (everything just averaged) nothing."""
    return {
        "params": (8 // 2) * P4,
        "state/exp_avg": (8 // 4) * P4,
        "state/exp_avg_sq": (8 // 8) * P4,
        "setup": P4,  # rank 0's weights, broadcast once
        "eval": 1 * P4,
        "checkpoint": 1 * P4,
    }


def check_fit(ranks, devices):
    assert_trained_on(ranks, devices)
    expected = expected_fit_ledger()
    for result in ranks:
        assert {k: result["ledger_bytes"].get(k, 0) for k in expected} == expected
        assert result["ddp_equivalent_bytes"] == 8 * P4
        assert result["optimizer_steps"] == [8]
    assert_schedule_rounds(ranks, steps=8, round_steps={2, 4, 6, 8})
    for result in ranks:  # the end of training: the consensus, here the round after step 8
        assert torch.equal(result["final"], ranks[0]["post"][8])


# ----------------------------------------------------------------------------------------------- one device
@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    return out, launch("fit", out)


def test_two_ranks_on_one_device_train_there_and_send_the_scheduled_bytes(fit_run):
    _, ranks = fit_run
    check_fit(ranks, [SHARED_DEVICE, SHARED_DEVICE])
    for result in ranks:
        assert result["backend"] == ONE_DEVICE_BACKEND


def test_consensus_validation_evaluates_the_mean_and_gives_the_local_parameters_back(fit_run):
    _, ranks = fit_run
    assert sorted(ranks[0]["val_local"]) == [3, 6]
    mean3 = mean_over_ranks([r["val_local"][3] for r in ranks])
    for result in ranks:
        assert torch.equal(result["val_local"][3], result["post"][3])
        assert torch.equal(result["val_evaluated"][3], mean3)
        assert torch.equal(result["after_val"][3], result["val_local"][3])  # step 4 starts from its own
        # after step 6 the ranks were just averaged: validation evaluates what they hold
        assert torch.equal(result["val_evaluated"][6], ranks[0]["post"][6])


def test_checkpoints_saved_on_the_device_load_on_the_cpu(fit_run):
    out, ranks = fit_run
    for step in (4, 8):  # both sync steps: the consensus is what every rank holds
        main = torch.load(out / "ckpts" / f"epoch=0-step={step}.ckpt", map_location="cpu", weights_only=True)
        params = torch.cat([main["state_dict"][k].reshape(-1)
                            for k in ("net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias")])
        assert torch.equal(params, ranks[0]["post"][step])
        assert main["desloc"]["optimizer_steps"] == [step]


# ----------------------------------------------------------------------------------------------- checkpoint
def shard_states(main_path):
    """The shards of a main file read without the package: its save id -> manifest -> each rank's file."""
    meta = torch.load(main_path, map_location="cpu", weights_only=True)["desloc"]
    directory = os.path.join(os.path.realpath(main_path) + ".shards", meta["save_id"])
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    return [torch.load(os.path.join(directory, e["file"]), map_location="cpu", weights_only=True)
            for e in manifest["shards"]]


def flat_state_dict(state_dict):
    return torch.cat([state_dict[k].reshape(-1) for k in ("net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias")])


def flat_moment(optimizer_state, key):
    return torch.cat([optimizer_state["state"][i][key].reshape(-1) for i in sorted(optimizer_state["state"])])


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint")
    return out, launch("checkpoint", out)


def test_checkpoint_main_file_is_the_mean_of_the_shards(checkpoint_run):
    out, ranks = checkpoint_run
    assert_trained_on([r["reference"] for r in ranks], [SHARED_DEVICE, SHARED_DEVICE])
    path = out / "reference" / "ckpts" / "epoch=0-step=5.ckpt"
    main = torch.load(path, map_location="cpu", weights_only=True)
    shards = shard_states(path)
    assert len(shards) == 2
    local = [flat_state_dict(s["state_dict"]) for s in shards]
    assert not torch.equal(local[0], local[1])  # step 5 is between parameter averages (K_x=3)
    assert torch.equal(flat_state_dict(main["state_dict"]), mean_over_ranks(local))
    for key in ("exp_avg", "exp_avg_sq"):
        own = [flat_moment(s["optimizer_states"][0], key) for s in shards]
        assert torch.equal(flat_moment(main["optimizer_states"][0], key), mean_over_ranks(own))
    for r, shard in enumerate(shards):  # each shard holds its rank's own parameters of step 5
        assert torch.equal(flat_state_dict(shard["state_dict"]), ranks[r]["reference"]["post"][5])
        if MODE == "cuda":  # the shard's RNG includes the GPU's generator (dropout draws from it)
            assert "cuda" in shard["rng"]
    # two saves (after epochs 0 and 1), each one consensus round of params, exp_avg and exp_avg_sq in float64
    assert ranks[0]["reference"]["ledger_bytes"]["checkpoint"] == 2 * 3 * P8


def test_same_size_resume_continues_bit_for_bit(checkpoint_run):
    _, ranks = checkpoint_run
    for r, result in enumerate(ranks):
        reference, resumed = result["reference"], result["resumed"]
        assert resumed["resume"] == "local"
        assert torch.equal(resumed["initial"], reference["post"][5])  # this rank's own parameters, not the mean
        assert sorted(resumed["post"]) == list(range(6, 11))
        for step in range(6, 11):
            assert torch.equal(resumed["post"][step], reference["post"][step]), (r, step)
        for key in ("final", "final_exp_avg", "final_exp_avg_sq"):
            assert torch.equal(resumed[key], reference[key]), (r, key)
        assert resumed["optimizer_steps"] == [10]


# ----------------------------------------------------------------------------------------------- two devices
def test_two_devices_under_nccl(tmp_path):
    if MODE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (one per rank under NCCL)")
    backend = "nccl" if MODE == "cuda" else "gloo"
    ranks = launch_multi_device("fit", tmp_path, backend=backend, devices=2)
    check_fit(ranks, ["cuda:0", "cuda:1"] if MODE == "cuda" else ["cpu", "cpu"])
    for result in ranks:
        assert result["backend"] == backend
