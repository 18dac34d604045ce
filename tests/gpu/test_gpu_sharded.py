"""Sharded groups on one GPU: 4 ranks sharing device 0 under ``cuda:gloo`` (a group with no CPU backend:
a CPU tensor in any collective, FSDP2's included, fails as under NCCL), in 2 groups of 2.

Expectations: FSDP2 inside the groups gives every rank the rows of the unsharded run's tensors (DDP
inside the groups, same schedule) after every step; the bytes across groups are half the unsharded
run's; a checkpoint directory saved after epoch 0 (step 3) resumes on the local path and repeats steps 4 to 6 bit
for bit; everything stays on the GPU."""

import torch

from gpu_harness import SHARED_DEVICE, launch

WORLD, G_SIZE, STEPS = 4, 2, 6


def _rows(full, position):
    n = full.shape[0] // G_SIZE
    return full[position * n:(position + 1) * n]


def test_sharded_groups_on_one_device(tmp_path):
    ranks = launch("sharded", tmp_path, world=WORLD)
    for rank, result in enumerate(ranks):
        assert result["global_rank"] == rank
        plain, sharded, resumed = result["ddp"], result["fsdp"], result["resumed"]
        assert sharded["types"] == ["DTensor"] and plain["types"] == ["Parameter"]
        assert sharded["devices"] == plain["devices"] == [SHARED_DEVICE]
        position = rank % G_SIZE
        for step in range(1, STEPS + 1):
            for key in ("params", "exp_avg", "exp_avg_sq"):
                for a, b in zip(sharded["steps"][step][key], plain["steps"][step][key]):
                    # float32: FSDP2's reduce-scatter and DDP's all-reduce may add in another order
                    torch.testing.assert_close(a, _rows(b, position), rtol=1e-5, atol=1e-6,
                                               msg=f"rank {rank} step {step} {key}")
        for key in ("params", "state/exp_avg", "state/exp_avg_sq"):
            assert 2 * sharded["ledger_bytes"].get(key, 0) == plain["ledger_bytes"].get(key, 0), (rank, key)
        assert resumed["resume"] == "local" and sorted(resumed["steps"]) == [4, 5, 6]
        for step in (4, 5, 6):
            for key in ("params", "exp_avg", "exp_avg_sq"):
                assert all(torch.equal(a, b) for a, b in zip(resumed["steps"][step][key], sharded["steps"][step][key])), \
                    (rank, step, key)
