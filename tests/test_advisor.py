"""The period advisor (``python -m lightning_desloc periods``): expectations derived by hand in each test
from the ring all-reduce model and the policy's formulas, plus a cross-check against ``choose_periods``."""

import json
import math
import subprocess
import sys

import pytest

from lightning_desloc.__main__ import main as cli_main
from lightning_desloc.adaptive import choose_periods
from lightning_desloc.advisor import advise, main, parse_bandwidth, parse_count

# 1M fp32 params, 2 ranks, 100 Mbit/s = 12.5e6 B/s, no latency, 100 ms steps, budget 5%
BASE = ["--params", "1000000", "--link", "100mbit", "--step-time", "0.1"]


def run_json(capsys, *extra):
    assert main([*BASE, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("text, count", [
    ("124M", 124_000_000), ("1.3B", 1_300_000_000), ("350k", 350_000), ("1000000", 1_000_000), ("2.5m", 2_500_000),
])
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text, bytes_per_s", [
    ("1gbit", 125e6), ("100mbit", 12.5e6), ("10gbit", 1.25e9), ("25MB/s", 25e6), ("10Gbps", 1.25e9),
    ("1MiB/s", 1024 * 1024), ("800 kbit/s", 100e3),
])
def test_parse_bandwidth_bits_and_bytes(text, bytes_per_s):
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("parse, text", [(parse_count, "12x"), (parse_count, "M"), (parse_bandwidth, "100"),
                                         (parse_bandwidth, "fast"), (parse_bandwidth, "10 furlongs")])
def test_parsers_reject_garbage(parse, text):
    with pytest.raises(ValueError):
        parse(text)


def test_hand_derived_example(capsys):
    out = run_json(capsys)
    # B = 4e6 bytes; t_round = 2*1/2 * 4e6 / 12.5e6 = 0.32 s; ideal K = 0.32 / (0.05 * 0.1) = 64
    assert out["model"]["round_time_s"] == pytest.approx(0.32)
    assert out["model"]["ideal_param_sync_every"] == pytest.approx(64.0)
    # K_u = 64 * ceil(max(192, 6.58) / 64) = 192;  K_v = 64 * ceil(max(384, 692.8) / 64) = 704
    assert out["recommendation"] == {"param_sync_every": 64, "state_sync_every": {"exp_avg": 192, "exp_avg_sq": 704}}
    assert out["half_lives"]["exp_avg"] == pytest.approx(6.579, abs=1e-3)
    assert out["half_lives"]["exp_avg_sq"] == pytest.approx(692.8, abs=0.05)
    assert out["ddp"] == pytest.approx({"time_per_step_s": 0.42, "bytes_per_step": 4e6})
    rows = {r["param_sync_every"]: r for r in out["table"]}
    assert len(out["table"]) <= 8 and rows[64]["recommended"] and sum(r["recommended"] for r in out["table"]) == 1
    sets_per_step = 1 / 64 + 1 / 192 + 1 / 704  # params + each state at its own period
    assert rows[64]["link_share"] == pytest.approx(0.32 / (64 * 0.1 + 0.32))
    assert rows[64]["time_per_step_s"] == pytest.approx(0.1 + 0.32 / 64 + 0.32 / 192 + 0.32 / 704)
    assert rows[64]["bytes_per_step"] == pytest.approx(4e6 * sets_per_step)
    assert rows[64]["vs_ddp"] == pytest.approx(1 / sets_per_step)                 # about 44.9x
    assert rows[64]["vs_local"] == pytest.approx((3 / 64) / sets_per_step)        # about 2.11x
    # another row: K_x = 8 -> K_u = 24, K_v = 8 * ceil(692.8 / 8) = 696
    assert rows[8]["state_sync_every"] == {"exp_avg": 24, "exp_avg_sq": 696}
    assert rows[8]["time_per_step_s"] == pytest.approx(0.1 + 0.32 / 8 + 0.32 / 24 + 0.32 / 696)
    assert out["inputs"]["link_Bps"] == pytest.approx(12.5e6) and out["inputs"]["workers"] == 2


def test_latency_adds_per_ring_step(capsys):
    out = run_json(capsys, "--workers", "4", "--latency-ms", "2")
    # 2*3/4 * 4e6 / 12.5e6 = 0.48 s of bytes + 2*3 * 2 ms = 0.012 s -> 0.492; ideal 98.4 -> K_x = 128
    assert out["model"]["round_time_s"] == pytest.approx(0.492)
    assert out["model"]["state_round_time_s"] == pytest.approx(0.48)  # riding along: bytes, no latency
    assert out["recommendation"] == {"param_sync_every": 128, "state_sync_every": {"exp_avg": 384, "exp_avg_sq": 768}}
    row = next(r for r in out["table"] if r["recommended"])
    assert row["time_per_step_s"] == pytest.approx(0.1 + 0.492 / 128 + 0.48 / 384 + 0.48 / 768)
    assert out["ddp"]["bytes_per_step"] == pytest.approx(1.5 * 4e6)


@pytest.mark.parametrize("steps, k_x, cap", [
    ("1200", 32, 32),        # 1200 / 32 = 37.5 -> 32 < 64: the cap wins
    ("100", 8, 8),           # 3.1 -> 2, but never below 8
    ("100000", 64, 1024),    # 3125 -> 2048, clipped to 1024: the budget's 64 stands
])
def test_steps_cap_k_x(capsys, steps, k_x, cap):
    out = run_json(capsys, "--steps", steps)
    assert out["model"]["max_period"] == cap
    assert out["recommendation"]["param_sync_every"] == k_x
    assert all(r["over_cap"] == (r["param_sync_every"] > cap) for r in out["table"])


def test_bf16_halves_the_round(capsys):
    out = run_json(capsys, "--bytes-per-param", "2")  # 0.16 s -> ideal 32
    assert out["model"]["round_time_s"] == pytest.approx(0.16)
    assert out["recommendation"]["param_sync_every"] == 32


def test_sgd_has_only_momentum(capsys):
    out = run_json(capsys, "--optimizer", "sgd", "--momentum", "0.99")
    tau = math.log(0.5) / math.log(0.99)  # 69.0 < 3 * 64
    assert out["half_lives"] == pytest.approx({"momentum_buffer": tau})
    assert out["recommendation"] == {"param_sync_every": 64, "state_sync_every": {"momentum_buffer": 192}}
    row = next(r for r in out["table"] if r["recommended"])
    assert row["vs_local"] == pytest.approx((2 / 64) / (1 / 64 + 1 / 192))


@pytest.mark.parametrize("params, link_Bps, workers, latency_s, step_s, budget, steps", [
    (124e6, 125e6, 8, 0.0005, 0.3, 0.05, None), (1.3e9, 1.25e9, 16, 0.001, 1.0, 0.1, 5000),
    (350e3, 25e6, 2, 0.02, 0.01, 0.05, None), (7e9, 12.5e6, 4, 0.0, 2.0, 0.02, 20000),
])
def test_agrees_with_choose_periods(params, link_Bps, workers, latency_s, step_s, budget, steps):
    betas = {"exp_avg": 0.9, "exp_avg_sq": 0.999}
    round_s = 2 * (workers - 1) / workers * params * 4 / link_Bps + 2 * (workers - 1) * latency_s
    cap = 1024 if steps is None else min(1024, max(8, 2 ** math.floor(math.log2(steps / 32))))
    advice = advise(int(params), link_Bps, step_s, 4, workers, latency_s, betas, budget, steps)
    k_x, periods = choose_periods(step_s, round_s, betas, budget, max_period=cap)
    assert advice["recommendation"] == {"param_sync_every": k_x, "state_sync_every": periods}


def test_text_report(capsys):
    assert main(BASE) == 0
    text = capsys.readouterr().out
    assert "320.0 ms" in text and "692.8" in text and "420.0 ms/step" in text
    assert "param_sync_every=64, state_sync_every={'exp_avg': 192, 'exp_avg_sq': 704}" in text
    recommended = [line.split() for line in text.splitlines() if line.startswith("*")]
    assert recommended[0][:4] == ["*", "64", "192", "704"] and recommended[0][4] == "4.8%"


@pytest.mark.parametrize("flag, value", [
    ("--params", "12x"), ("--link", "100"), ("--beta2", "1.5"), ("--beta1", "0"), ("--step-time", "-1"),
    ("--workers", "1"), ("--comm-budget", "1"), ("--steps", "0"), ("--latency-ms", "-2"),
])
def test_bad_flag_exit_2_names_it(capsys, flag, value):
    args = [a for a in BASE]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "e.g. " + flag in err


def test_usage_without_subcommand(capsys):
    assert cli_main([]) == 2 and "periods" in capsys.readouterr().err
    assert cli_main(["nonsense"]) == 2 and "nonsense" in capsys.readouterr().err
    assert cli_main(["periods", *BASE[:2]]) == 2  # dispatched: the advisor's own --link/--step-time errors


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "lightning_desloc", "periods", "--params", "1M", "--link",
                           "100mbit", "--step-time", "0.1", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recommendation"]["param_sync_every"] == 64
