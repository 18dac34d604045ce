"""Averaging on real gloo processes: the mean over ranks, in one round, bytes counted per category."""

import torch

from lightning_desloc.averaging import average_, broadcast_
from lightning_desloc.ledger import CommLedger

from helpers import run_on_processes


def rank_tensors(rank):
    """Tensors whose values depend on the rank, in several dtypes and layouts."""
    g = torch.Generator().manual_seed(100 + rank)
    return {
        "params": [torch.randn(5, 3, generator=g), torch.randn(7, generator=g, dtype=torch.float64)],
        "state/exp_avg": [torch.randn(4, 6, generator=g).t()],  # non-contiguous
        "state/exp_avg_sq": [torch.rand(3, generator=g).to(torch.bfloat16)],
    }


def _average_worker(rank, world, out_dir):
    tensors = rank_tensors(rank)
    ledger = CommLedger()
    # a tiny bucket cap forces several buckets per dtype: still one round
    average_(tensors, ledger, bucket_cap_bytes=32)
    torch.save({"tensors": tensors, "ledger": ledger.state_dict()}, f"{out_dir}/avg{rank}.pt")


def test_average_is_mean_over_ranks_in_one_round(tmp_path):
    world = 3
    run_on_processes(_average_worker, world, str(tmp_path))
    per_rank = [rank_tensors(r) for r in range(world)]
    for rank in range(world):
        got = torch.load(tmp_path / f"avg{rank}.pt")
        for cat, tensors in got["tensors"].items():
            for i, t in enumerate(tensors):
                stack = torch.stack([per_rank[r][cat][i].double() for r in range(world)])
                expected = stack.mean(0).to(t.dtype)
                tol = 1e-2 if t.dtype == torch.bfloat16 else 1e-6
                torch.testing.assert_close(t, expected, rtol=tol, atol=tol)
        ledger = got["ledger"]
        assert ledger["rounds"] == 1
        assert ledger["bytes"] == {"params": (15 * 4) + (7 * 8), "state/exp_avg": 24 * 4, "state/exp_avg_sq": 3 * 2}


def _broadcast_worker(rank, world, out_dir):
    tensors = [torch.full((4,), float(rank)), torch.full((2, 2), 10.0 + rank, dtype=torch.float64)]
    ledger = CommLedger()
    broadcast_(tensors, src=1, ledger=ledger, bucket_cap_bytes=8)
    torch.save({"tensors": tensors, "ledger": ledger.state_dict()}, f"{out_dir}/bc{rank}.pt")


def test_broadcast_copies_source_rank(tmp_path):
    run_on_processes(_broadcast_worker, 2, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"bc{rank}.pt")
        assert torch.equal(got["tensors"][0], torch.full((4,), 1.0))
        assert torch.equal(got["tensors"][1], torch.full((2, 2), 11.0, dtype=torch.float64))
        assert got["ledger"]["bytes"] == {"setup": 16 + 32}
