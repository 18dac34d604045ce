"""Averaging on real gloo processes: the mean over ranks, in one round, bytes counted per category."""

import time
import weakref

import torch
import torch.distributed as dist

from lightning_desloc.averaging import DEFAULT_BUCKET_CAP_BYTES, average_, broadcast_, start_average_round
from lightning_desloc.comm import Comm
from lightning_desloc.compression import CompressionPlan
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


# --------------------------------------------------------------------------- bfloat16/float16: summed in float32
def low_precision_tensors(rank):
    """bfloat16 values in [1, 2) (a bfloat16 running sum over 4 ranks rounds their last bits away) in
    tensors of odd sizes (every bucket is padded to a multiple of the world), and float16 values near
    30000 (4 of them overflow float16, whose largest finite value is 65504)."""
    g = torch.Generator().manual_seed(300 + rank)
    bf16 = [(1 + torch.rand(n, generator=g)).to(torch.bfloat16) for n in (1001, 37, 64, 3)]
    fp16 = [torch.full((5,), 30000.0 + 32 * rank, dtype=torch.float16)]  # mean 30048: a float16 value
    return {"params": bf16, "state/exp_avg": fp16}


def _low_precision_worker(rank, world, out_dir):
    ledgers, results = {}, {}
    for cap in (DEFAULT_BUCKET_CAP_BYTES, 128):
        tensors = low_precision_tensors(rank)
        ledger = CommLedger()
        average_(tensors, ledger, bucket_cap_bytes=cap)
        results[cap], ledgers[cap] = tensors, ledger.state_dict()
    # the overlapped path: snapshots and means of the same buckets, the tensors left as they are
    tensors = low_precision_tensors(rank)
    buckets, works, _, calls = start_average_round(tensors, world, None, 128)
    for work in works:
        work.wait()
    # the checkpoint's reduction to rank 0: the same means, on rank 0 alone
    tensors = low_precision_tensors(rank)
    comm, to_rank0 = Comm(CommLedger()), []
    flat = [t for ts in tensors.values() for t in ts]
    comm.reduce_mean_to_(flat, lambda bucket, mean: to_rank0.append((len(bucket), mean.clone())),
                         bucket_cap_bytes=128)
    torch.save({"results": results, "ledgers": ledgers, "untouched": tensors, "buckets": buckets,
                "overlap_calls": calls, "to_rank0": to_rank0, "reduce_ledger": comm.ledger.state_dict()},
               f"{out_dir}/lp{rank}.pt")


def test_bf16_and_fp16_buckets_are_summed_in_float32_and_rounded_once(tmp_path):
    world = 4
    run_on_processes(_low_precision_worker, world, str(tmp_path))
    per_rank = [low_precision_tensors(r) for r in range(world)]
    # the float32 sum of 4 values in [1, 2) with 8 significant bits is exact, and so is the division by 4:
    # the mean must be the exact mean rounded to bfloat16 once (a bfloat16 sum is off by an ulp or more)
    expected = {cat: [torch.stack([per_rank[r][cat][i].double() for r in range(world)]).mean(0).to(t.dtype)
                      for i, t in enumerate(ts)] for cat, ts in per_rank[0].items()}
    assert torch.equal(expected["state/exp_avg"][0], torch.full((5,), 30048.0, dtype=torch.float16))
    for rank in range(world):
        got = torch.load(tmp_path / f"lp{rank}.pt")
        for cap, tensors in got["results"].items():
            for cat, ts in tensors.items():
                for t, want in zip(ts, expected[cat]):
                    assert torch.equal(t, want), (rank, cap, cat)
        # bytes: the tensors' own (2 bytes per element), once; calls: 2 collectives per bucket
        # (default cap: one bf16 and one fp16 bucket; 128 bytes: [1001], [37], [64], [3] and the fp16 one)
        for cap, buckets in ((DEFAULT_BUCKET_CAP_BYTES, 2), (128, 5)):
            ledger = got["ledgers"][cap]
            assert ledger["bytes"] == {"params": 2 * (1001 + 37 + 64 + 3), "state/exp_avg": 10}
            assert (ledger["rounds"], ledger["calls"]) == (1, 2 * buckets)
        # the checkpoint's reduction: float32 on the wire (4 bytes per element, counted as such), the
        # same once-rounded means, on rank 0 only
        assert got["reduce_ledger"]["bytes"] == {"checkpoint": 4 * (1001 + 37 + 64 + 3 + 5)}
        if rank == 0:
            flat_expected = [t for cat in ("params", "state/exp_avg") for t in expected[cat]]
            # buckets of at most 128 bytes of the tensors' own dtype: one tensor each
            assert [n for n, _ in got["to_rank0"]] == [1, 1, 1, 1, 1]
            for (_, mean), want in zip(got["to_rank0"], flat_expected):
                assert mean.dtype == want.dtype and torch.equal(mean, want.reshape(-1))
        else:
            assert got["to_rank0"] == []
        # the overlapped path gets the same means, leaves the tensors alone and keeps each snapshot
        assert got["overlap_calls"] == 2 * 5
        for cat, ts in got["untouched"].items():
            assert all(torch.equal(t, mine) for t, mine in zip(ts, per_rank[rank][cat]))
            for (snapshot, mean), t, want in zip(got["buckets"][cat], per_rank[rank][cat], expected[cat]):
                assert torch.equal(snapshot, t.reshape(-1)) and torch.equal(mean, want.reshape(-1))


# --------------------------------------------------------------------------- the pipeline: two buckets at a time
class LiveFlats:
    """Wraps the collectives that start a bucket (``all_reduce``, ``all_to_all_single``) in this process
    (they still run) and, each time one is issued, counts the flat buffers handed to them that are still
    alive: the new one, the ones whose work has not been waited for, and any the round keeps after the
    wait. A tensor's Python object lives as long as anything, a pending work included, holds it, so a weak
    reference dies with the buffer; gloo's threads let go of a finished work a moment after ``wait``
    returns, so a waited buffer is given up to a second to die before it counts."""

    FIRST = {"all_reduce": 0, "all_to_all_single": 1}  # collective -> position of the flat it is handed

    def __init__(self):
        self.flats, self.waited, self.most, self.originals = [], set(), 0, {}

    def _alive(self):
        deadline = time.monotonic() + 1.0
        while any(self.flats[i]() is not None for i in self.waited) and time.monotonic() < deadline:
            time.sleep(0.001)
        return sum(ref() is not None for ref in self.flats)

    def _wrap(self, position, original):
        def counted(*args, **kwargs):
            index = len(self.flats)
            self.flats.append(weakref.ref(args[position]))
            self.most = max(self.most, self._alive())
            return _WaitRecorded(original(*args, **kwargs), lambda: self.waited.add(index))
        return counted

    def __enter__(self):
        for name, position in self.FIRST.items():
            self.originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(position, self.originals[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


class _WaitRecorded:
    """A work handle that reports its ``wait``."""

    def __init__(self, work, on_wait):
        self.work, self.on_wait = work, on_wait

    def wait(self):
        self.work.wait()
        self.on_wait()


def pipeline_tensors(rank):
    """Eight float32 tensors of 256 bytes and six bfloat16 ones of 128: with a 256-byte cap, eight
    float32 buckets and three bfloat16 ones."""
    g = torch.Generator().manual_seed(500 + rank)
    return {"params": [torch.randn(64, generator=g) for _ in range(8)],
            "state/exp_avg": [torch.randn(64, generator=g).to(torch.bfloat16) for _ in range(6)]}


def _pipeline_worker(rank, world, out_dir):
    one_bucket = pipeline_tensors(rank)
    average_(one_bucket, bucket_cap_bytes=DEFAULT_BUCKET_CAP_BYTES)
    tensors, ledger = pipeline_tensors(rank), CommLedger()
    with LiveFlats() as live:
        average_(tensors, ledger, bucket_cap_bytes=256)
    torch.save({"tensors": tensors, "one_bucket": one_bucket, "most_live": live.most, "n_flats": len(live.flats),
                "calls": ledger.calls}, f"{out_dir}/pipe{rank}.pt")


def test_a_round_holds_at_most_two_flat_buckets(tmp_path):
    world = 2
    run_on_processes(_pipeline_worker, world, str(tmp_path))
    per_rank = [pipeline_tensors(r) for r in range(world)]
    for rank in range(world):
        got = torch.load(tmp_path / f"pipe{rank}.pt")
        # packing every bucket before the first wait would hold all 11 at the last issue
        assert got["most_live"] == 2, got["most_live"]
        assert got["n_flats"] == 8 + 3 and got["calls"] == 8 + 2 * 3
        # the same values as in one bucket per dtype (bit for bit: a 2-rank sum does not depend on order)
        for cat, ts in got["tensors"].items():
            for i, t in enumerate(ts):
                assert torch.equal(t, got["one_bucket"][cat][i])
                want = torch.stack([per_rank[r][cat][i].double() for r in range(world)]).mean(0).to(t.dtype)
                assert torch.equal(t, want) if t.dtype == torch.bfloat16 else torch.allclose(t, want.float())


def coded_pipeline_tensors(rank):
    """bf16-coded parameters (a non-contiguous 16 x 8 tensor, then seven of 64 elements: 576) and an exact
    float32 first moment of 4 x 64: with a 256-byte cap, 4 exact buckets and 9 coded ones of 64 elements
    (a float32 message of 256 bytes), the first two cutting the non-contiguous tensor in half."""
    g = torch.Generator().manual_seed(700 + rank)
    return {"params": [torch.randn(8, 16, generator=g).t()] + [torch.randn(64, generator=g) for _ in range(7)],
            "state/exp_avg": [torch.randn(64, generator=g) for _ in range(4)]}


def _coded_pipeline_worker(rank, world, out_dir):
    one_bucket = coded_pipeline_tensors(rank)
    average_(one_bucket, compression=CompressionPlan({"params": "bf16"}))
    tensors, ledger = coded_pipeline_tensors(rank), CommLedger()
    with LiveFlats() as live:
        average_(tensors, ledger, bucket_cap_bytes=256, compression=CompressionPlan({"params": "bf16"}))
    torch.save({"tensors": tensors, "one_bucket": one_bucket, "most_live": live.most, "n_flats": len(live.flats),
                "ledger": ledger.state_dict()}, f"{out_dir}/coded{rank}.pt")


def test_a_round_holds_at_most_two_coded_buckets(tmp_path):
    world = 2
    run_on_processes(_coded_pipeline_worker, world, str(tmp_path))
    per_rank = [coded_pipeline_tensors(r) for r in range(world)]
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    for rank in range(world):
        got = torch.load(tmp_path / f"coded{rank}.pt")
        # the flats handed to the collectives: 4 all-reduced buckets, then the 9 coded buckets' send buffers
        assert got["most_live"] == 2, got["most_live"]
        assert got["n_flats"] == 4 + 9
        # bytes: 2 per bf16 element, 4 per float32 one; calls: 1 per exact bucket, 2 per coded one
        assert got["ledger"]["bytes"] == {"params": 2 * 576, "state/exp_avg": 4 * 256}
        assert got["ledger"]["calls"] == 4 + 2 * 9
        for cat, ts in got["tensors"].items():
            for i, t in enumerate(ts):
                # bit for bit what one bucket per category gives, and the coded mean for params
                assert torch.equal(t, got["one_bucket"][cat][i])
                a, b = (per_rank[r][cat][i] for r in range(world))
                want = bf16((bf16(a) + bf16(b)) / 2) if cat == "params" else (a + b) / 2
                assert torch.equal(t, want), (cat, i)
