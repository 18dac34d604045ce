"""Compressed averaging: codecs against hand-written quantisation, and real gloo rounds."""

import math

import pytest
import torch
import torch.distributed as dist

from lightning_desloc.averaging import DEFAULT_BUCKET_CAP_BYTES, average_
from lightning_desloc.compression import Bf16Codec, CompressionPlan, Int8Codec, bucket_numels, parse_compression
from lightning_desloc.ledger import CommLedger
from lightning_desloc.snapshot import ConsensusSnapshot

from helpers import N_PARAMS, START_METHOD, Regression, quiet_trainer, run_on_processes
from lightning_desloc import DeslocStrategy


def int8_by_hand(x, chunk):
    """Per-chunk absmax int8 quantisation written out element by element."""
    out = []
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].tolist()
        scale = max(abs(v) for v in part) / 127
        out += [0.0 if scale == 0 else max(-127, min(127, round(v / scale))) * scale for v in part]
    return torch.tensor(out)


def int8_round_trip(x, chunk, non_negative=False):
    """decode(encode(x)) for int8, re-derived in float32 torch: per chunk of ``chunk`` elements (the last
    one zero padded) ``s = max|y| / 127``, ``q = round(y / s)``, value ``q * s``; for a non-negative
    state ``y = sqrt(x)``, ``q >= 1/2`` and the value squared."""
    y = x.clamp(min=0).sqrt() if non_negative else x
    blocks = torch.cat([y, y.new_zeros(-y.numel() % chunk)]).view(-1, chunk)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(scale > 0, blocks / scale, 0.0).round().clamp(-127, 127)
    if non_negative:
        q = q.clamp(min=0.5)
    out = (q * scale).view(-1)[: x.numel()]
    return out.square() if non_negative else out


def bf16_round_trip(x):
    return x.to(torch.bfloat16).float()


def coded_mean(messages, round_trip):
    """The coded round's mean: every message rounded by the codec, added in float32 in rank order,
    divided by M, and that mean rounded by the codec again (the mean parts travel encoded too)."""
    total = round_trip(messages[0]).clone()
    for m in messages[1:]:
        total += round_trip(m)
    return round_trip(total / len(messages))


def test_int8_codec_matches_hand_quantisation_and_byte_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.linspace(0.01, 10, 1000)
    codec = Int8Codec(chunk=64)
    payload = codec.encode(x)
    assert payload.numel() == codec.nbytes(1000) == 1000 + 4 * math.ceil(1000 / 64)
    torch.testing.assert_close(codec.decode(payload, 1000), int8_by_hand(x, 64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("numel", [1, 7, 1001])
def test_codecs_decode_odd_sizes_and_unaligned_slices(numel):
    # A payload for an odd-sized tensor puts the int8 scales at an unaligned byte, and a payload
    # cut from a shared buffer may itself start at an odd byte.
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    for codec, expected in [(Int8Codec(chunk=64), int8_by_hand(x, 64)), (Bf16Codec(), x.to(torch.bfloat16).float())]:
        buffer = torch.cat([torch.zeros(3, dtype=torch.uint8), codec.encode(x)])
        torch.testing.assert_close(codec.decode(buffer[3:], numel), expected, rtol=1e-6, atol=1e-6)


def test_second_moments_are_coded_by_square_root_and_never_decode_to_zero():
    v = torch.tensor([4.0, 1e-12, 0.0, 1.0])
    codec = Int8Codec(chunk=4, non_negative=True)
    decoded = codec.decode(codec.encode(v), 4)
    assert decoded[0] == pytest.approx(4.0)
    assert decoded[3] == pytest.approx(1.0, rel=0.02)
    smallest = (2.0 / 127 * 0.5) ** 2  # half a quantisation step of sqrt(v), squared
    assert decoded[1:3].tolist() == pytest.approx([smallest, smallest])


def test_bf16_codec_is_bfloat16_rounding():
    x = torch.randn(37)
    codec = Bf16Codec()
    assert codec.nbytes(37) == codec.encode(x).numel() == 74
    assert torch.equal(codec.decode(codec.encode(x), 37), x.to(torch.bfloat16).float())


def test_bad_wire_format_names_the_choices():
    with pytest.raises(ValueError, match=r"choose one of \('none', 'bf16', 'int8'\)"):
        parse_compression({"params": "fp8"})
    assert parse_compression("bf16") == {"*": "bf16"}
    assert parse_compression({"params": "none", "states": "int8"}) == {"states": "int8"}


def rank_values(rank, n=300):
    g = torch.Generator().manual_seed(7 + rank)
    return torch.randn(n, generator=g), torch.rand(n, generator=g)


def _compressed_worker(rank, world, out_dir):
    snapshot = ConsensusSnapshot()  # the core's consensus snapshot, held by the test here
    plan = CompressionPlan(wires={"params": "int8", "exp_avg_sq": "bf16"}, chunk=32, anchor=snapshot)
    start = torch.zeros(300)
    snapshot.take([start])  # equal on every rank, as after the setup broadcast
    results = []
    ledger = CommLedger()
    for round_ in range(2):
        x, v = rank_values(rank + 10 * round_)
        average_({"params": [x], "state/exp_avg_sq": [v]}, ledger, compression=plan)
        snapshot.take([x])  # as the core does after every parameter average
        results.append((x.clone(), v.clone()))
    torch.save({"results": results, "ledger": ledger.state_dict()}, f"{out_dir}/c{rank}.pt")


def test_compressed_round_on_real_processes(tmp_path):
    world = 2
    run_on_processes(_compressed_worker, world, str(tmp_path))
    got = [torch.load(tmp_path / f"c{r}.pt") for r in range(world)]
    # every rank ends with bit-identical values
    for a, b in zip(got[0]["results"], got[1]["results"]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    anchor, residual = torch.zeros(300), [torch.zeros(300) for _ in range(world)]
    for round_ in range(2):
        xs = [rank_values(r + 10 * round_)[0] for r in range(world)]
        vs = [rank_values(r + 10 * round_)[1] for r in range(world)]
        # bf16 state: the mean of bfloat16-rounded values, itself rounded to bfloat16
        expected_v = coded_mean(vs, bf16_round_trip)
        torch.testing.assert_close(got[0]["results"][round_][1], expected_v, rtol=0, atol=0)
        # int8 params: anchor + the coded mean of (delta + residual), residual carried to the next round
        messages = [x - anchor + e for x, e in zip(xs, residual)]
        expected_x = anchor + coded_mean(messages, lambda m: int8_round_trip(m, 32))
        torch.testing.assert_close(got[0]["results"][round_][0], expected_x, rtol=1e-6, atol=1e-7)
        residual = [m - int8_round_trip(m, 32) for m in messages]
        anchor = expected_x
        # and it is close to the exact mean
        assert (expected_x - sum(xs) / world).abs().max() < 0.05
    ledger = got[0]["ledger"]
    assert ledger["bytes"] == {"params": 2 * (300 + 4 * math.ceil(300 / 32)), "state/exp_avg_sq": 2 * 600}
    assert ledger["rounds"] == 2


CODED_WIRES = {"params": "int8", "exp_avg": "bf16", "exp_avg_sq": "int8"}
CODED_CHUNK = 32


def coded_values(rank, round_):
    """Per rank and round: int8 parameters of 35 + 265 elements (10 scale chunks of 32, the last one
    partial), a bf16 first moment of 3 elements and an int8 second moment of 40 (with 4 ranks some parts
    are all padding)."""
    g = torch.Generator().manual_seed(1000 * round_ + rank)
    params = [torch.randn(5, 7, generator=g), torch.randn(265, generator=g) * 3]
    return {"params": params, "state/exp_avg": [torch.randn(3, generator=g)],
            "state/exp_avg_sq": [torch.rand(40, generator=g) ** 4]}


def _coded_rounds(group, rounds, bucket_cap_bytes=DEFAULT_BUCKET_CAP_BYTES):
    """``rounds`` coded rounds of :func:`coded_values` over ``group``: per round, what this rank ends with."""
    rank = dist.get_rank(group)
    snapshot = ConsensusSnapshot()  # the core's consensus snapshot, held by the test here
    plan = CompressionPlan(wires=dict(CODED_WIRES), chunk=CODED_CHUNK, anchor=snapshot)
    snapshot.take([torch.zeros(300)])  # equal on every rank, as after the setup broadcast
    ledger, history = CommLedger(), []
    for round_ in range(rounds):
        tensors = coded_values(rank, round_)
        average_(tensors, ledger, group=group, compression=plan, bucket_cap_bytes=bucket_cap_bytes)
        snapshot.take(tensors["params"])  # as the core does after every parameter average
        history.append({"tensors": tensors, "residual": plan.categories["params"].residual.clone(),
                        "anchor": snapshot.flat.clone()})
    return {"history": history, "ledger": ledger.state_dict()}


def _coded_worker(rank, world, out_dir, rounds, bucket_cap_bytes=DEFAULT_BUCKET_CAP_BYTES):
    # two groups of 2 ranks side by side, then all 4 ranks: both sizes in one set of processes
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    runs = {2: _coded_rounds(pairs[rank // 2], rounds, bucket_cap_bytes),
            4: _coded_rounds(None, rounds, bucket_cap_bytes)}
    torch.save(runs, f"{out_dir}/coded{rank}.pt")


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def check_coded_rounds(got, rounds, buckets=3):
    """``got``: per rank of one group, what :func:`_coded_rounds` returned; checked against the reference
    (the coded mean of each whole category: the buckets are cut at whole scale chunks per rank, so they
    give the same values bit for bit). ``buckets``: the coded buckets of a round (one per category by
    default), 2 collectives each."""
    world = len(got)
    anchor, residual = torch.zeros(300), [torch.zeros(300) for _ in range(world)]
    for round_ in range(rounds):
        sent = [coded_values(r, round_) for r in range(world)]
        # int8 parameters: the change since the anchor plus this rank's residual
        messages = [flat(s["params"]) - anchor + e for s, e in zip(sent, residual)]
        want = {"params": anchor + coded_mean(messages, lambda m: int8_round_trip(m, CODED_CHUNK)),
                "state/exp_avg": coded_mean([flat(s["state/exp_avg"]) for s in sent], bf16_round_trip),
                "state/exp_avg_sq": coded_mean([flat(s["state/exp_avg_sq"]) for s in sent],
                                               lambda v: int8_round_trip(v, CODED_CHUNK, non_negative=True))}
        residual = [m - int8_round_trip(m, CODED_CHUNK) for m in messages]
        for rank in range(world):
            step = got[rank]["history"][round_]
            for cat, expected in want.items():
                result = flat(step["tensors"][cat])
                # every rank applies the same bytes: bit-identical to rank 0
                assert torch.equal(result, flat(got[0]["history"][round_]["tensors"][cat])), (world, rank, cat)
                torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-7, msg=f"{world} {rank} {cat}")
            # error feedback: what the first encoding left out of this rank's own message
            torch.testing.assert_close(step["residual"], residual[rank], rtol=1e-6, atol=1e-7)
            assert torch.equal(step["anchor"], got[0]["history"][round_]["anchor"])
        anchor = want["params"]
        # and the consensus stays within a quantisation step or two of the exact mean, round after round
        exact = sum(flat(s["params"]) for s in sent) / world
        assert (anchor - exact).abs().max() < 0.1
    nbytes = lambda n: n + 4 * math.ceil(n / CODED_CHUNK)  # noqa: E731  int8 values + float32 scales
    ledger = got[0]["ledger"]
    assert ledger["bytes"] == {"params": rounds * nbytes(300), "state/exp_avg": rounds * 2 * 3,
                               "state/exp_avg_sq": rounds * nbytes(40)}
    # per bucket one all-to-all, one all-gather
    assert (ledger["rounds"], ledger["calls"]) == (rounds, 2 * buckets * rounds)


def test_coded_reduce_scatter_on_2_and_4_processes_matches_reference_on_every_rank(tmp_path):
    rounds = 3
    run_on_processes(_coded_worker, 4, str(tmp_path), rounds)
    got = [torch.load(tmp_path / f"coded{r}.pt") for r in range(4)]
    check_coded_rounds([got[0][2], got[1][2]], rounds)
    check_coded_rounds([got[2][2], got[3][2]], rounds)
    check_coded_rounds([g[4] for g in got], rounds)


def test_bucketed_coded_round_on_2_and_4_processes_matches_reference_on_every_rank(tmp_path):
    # an 8-byte cap: a bucket holds 2 float32 message elements, rounded to whole scale chunks per rank.
    # M = 2: params (35 + 265 int8 elements, chunks of 32) in buckets of 64 elements: 64, 64, 64, 64, 44 (the
    # first one ends 29 elements into the second tensor); exp_avg (3 bf16) in 2 + 1; exp_avg_sq (40 int8)
    # in one: 8 buckets. M = 4: params 128, 128, 44; exp_avg 3; exp_avg_sq 40: 5 buckets.
    rounds = 2
    run_on_processes(_coded_worker, 4, str(tmp_path), rounds, 8)
    got = [torch.load(tmp_path / f"coded{r}.pt") for r in range(4)]
    check_coded_rounds([got[0][2], got[1][2]], rounds, buckets=8)
    check_coded_rounds([got[2][2], got[3][2]], rounds, buckets=8)
    check_coded_rounds([g[4] for g in got], rounds, buckets=5)


def test_coded_buckets_are_whole_scale_chunks_per_rank_and_add_up_to_the_encoded_size():
    int8, bf16 = Int8Codec(chunk=32), Bf16Codec()
    assert bucket_numels(int8, 300, cap_bytes=8, parts=2) == [64, 64, 64, 64, 44]
    assert bucket_numels(int8, 300, cap_bytes=8, parts=4) == [128, 128, 44]
    assert bucket_numels(int8, 300, cap_bytes=4 * 200, parts=2) == [192, 108]  # 200 rounded down to 3 x 64
    assert bucket_numels(bf16, 3, cap_bytes=8, parts=2) == [2, 1]
    assert bucket_numels(bf16, 3, cap_bytes=8, parts=4) == [3]
    assert bucket_numels(int8, 0, cap_bytes=8, parts=2) == []
    for numel in (1, 40, 300, 1001):
        for parts in (2, 3, 4):
            sizes = bucket_numels(int8, numel, cap_bytes=100, parts=parts)
            assert sum(sizes) == numel and sum(int8.nbytes(n) for n in sizes) == int8.nbytes(numel)


class ParamsAfterSync(Regression):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step % 4 == 0:  # right after a parameter average
            torch.save([p.detach().clone() for p in self.parameters()],
                       f"{self.out_dir}/p{self.global_rank}_{self.global_step}.pt")


def test_strategy_counts_encoded_bytes_and_ranks_agree(tmp_path):
    strategy = DeslocStrategy(param_sync_every=4, compression={"params": "int8", "states": "bf16"},
                              start_method=START_METHOD)
    quiet_trainer(strategy=strategy, max_steps=12, limit_val_batches=0).fit(ParamsAfterSync(n_batches=12, out_dir=str(tmp_path)))
    # 3 parameter averages (int8 + scales), exp_avg at 12 and exp_avg_sq at 24: one bf16 round of exp_avg
    int8_bytes = sum(n + 4 * math.ceil(n / 256) for n in [N_PARAMS])
    assert strategy.ledger.bytes["params"] == 3 * int8_bytes
    assert strategy.ledger.bytes["state/exp_avg"] == 1 * N_PARAMS * 2
    assert "state/exp_avg_sq" not in strategy.ledger.bytes
    for step in (4, 8, 12):
        p0, p1 = (torch.load(tmp_path / f"p{r}_{step}.pt") for r in range(2))
        for a, b in zip(p0, p1):
            assert torch.equal(a, b)
