"""The one reader of "bytes a rank has sent by step t" (``bytes_sent_by_step``) on hand-made ``metrics.csv``
files, and the benchmark scripts and the plot command that use it, against byte counts worked out by hand.

The rows look like what Lightning's CSVLogger writes for the GPT example: every column in every row,
empty cells where a row has no value; the ledger (``comm/...``) logged at ``trainer.global_step`` from
inside the optimizer step of each averaging round (so the round after optimizer step ``n`` lands at
``step = n - 1``), ``val/loss`` at ``step = n - 1`` too, the TrainClock's ``time/train_s`` at ``step = n``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import gptrun  # noqa: E402
import quality  # noqa: E402
from lightning_desloc import plot  # noqa: E402

P = 400.0  # parameter (= gradient) bytes of the hand-made model


def write_metrics(path: Path, rows: list[dict]) -> Path:
    """Rows the way CSVLogger writes them: one header of every key, ``""`` where a row has no value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for r in rows for k in r} | {"step"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def ledger(step: int, *, setup: float, params: float, control: float, eval_: float = 0.0, exp_avg: float = 0.0,
           ddp_equivalent: float) -> dict:
    """One ledger row as ``CommLedger.as_dict`` logs it: cumulative bytes per category, and totals."""
    cats = {"setup": setup, "params": params, "control": control, "eval": eval_, "state/exp_avg": exp_avg}
    row = {f"comm/bytes/{k}": v for k, v in cats.items() if v}
    total = sum(cats.values())
    row |= {"comm/bytes_total": total, "comm/bytes_ddp_equivalent": ddp_equivalent,
            "comm/bytes_saved": ddp_equivalent - (total - setup), "comm/rounds": 1.0, "step": step}
    return row


def desloc_rows() -> list[dict]:
    """K_x = 2, exp_avg every 4 steps, 6 optimizer steps, validation after steps 3 and 6, train loss
    logged every second step (so steps 1, 3 and 5 have no training row, and nothing at all is logged
    at step 4 but a training loss).

    By hand, per rank, setup broadcast (P) excluded:
      optimizer step 2 (step 1): params P, control 4                                  -> 404
      validation after step 3 (step 2): consensus eval P, logged with the next round
      optimizer step 4 (step 3): params 2P, eval P, exp_avg P, control 8               -> 1608
      optimizer step 6 (step 5): params 3P, eval P, exp_avg P, control 12              -> 2012
    """
    return [
        {"model/grad_bytes_per_step": P, "step": 0},
        {"train/loss": 2.0, "epoch": 0, "step": 0},
        ledger(1, setup=P, params=P, control=4, ddp_equivalent=2 * P),
        {"train/loss": 1.8, "epoch": 0, "step": 2},
        {"val/loss": 1.7, "step": 2},  # validation-only row, between two rounds
        {"time/train_s": 1.0, "time/fit_s": 1.2, "step": 3},
        ledger(3, setup=P, params=2 * P, control=8, eval_=P, exp_avg=P, ddp_equivalent=4 * P),
        {"train/loss": 1.6, "epoch": 0, "step": 4},
        ledger(5, setup=P, params=3 * P, control=12, eval_=P, exp_avg=P, ddp_equivalent=6 * P),
        {"val/loss": 1.5, "step": 5},
        {"time/train_s": 2.0, "time/fit_s": 2.5, "step": 6},  # the clock after the last validation
    ]


DESLOC_BY_STEP = {0: 0.0, 1: 404.0, 2: 404.0, 3: 1608.0, 4: 1608.0, 5: 2012.0, 6: 2012.0}


def ddp_rows() -> list[dict]:
    """8 optimizer steps, no ledger, validation after steps 4 and 8."""
    rows: list[dict] = [{"model/grad_bytes_per_step": P, "step": 0}]
    for n in range(1, 9):
        rows.append({"train/loss": 3.0 - n / 10, "epoch": 0, "step": n - 1})
        if n % 4 == 0:
            rows.append({"val/loss": 2.5 - n / 10, "step": n - 1})
            rows.append({"time/train_s": float(n), "time/fit_s": float(n) + 0.5, "step": n})
    return rows


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- the reader itself
def test_ledger_run_by_hand(tmp_path):
    rows = read(write_metrics(tmp_path / "metrics.csv", desloc_rows()))
    assert common.bytes_sent_by_step(rows) == DESLOC_BY_STEP
    # it is the ledger's compared bytes: every category but setup, summed from the row's own columns
    last = [r for r in rows if r["comm/bytes_total"]][-1]
    by_category = sum(float(v) for k, v in last.items()
                      if k.startswith("comm/bytes/") and k != "comm/bytes/setup" and v)
    assert by_category == DESLOC_BY_STEP[6] == float(last["comm/bytes_total"]) - P


def test_setup_is_excluded_and_ddp_equivalent_ignored(tmp_path):
    rows = read(write_metrics(tmp_path / "metrics.csv", desloc_rows()))
    sent = common.bytes_sent_by_step(rows)
    totals = {int(r["step"]): float(r["comm/bytes_total"]) for r in rows if r["comm/bytes_total"]}
    assert totals == {1: 804.0, 3: 2008.0, 5: 2412.0}  # the raw totals include the setup broadcast ...
    assert all(sent[t] == total - P for t, total in totals.items())  # ... the reader does not
    # a ledger row with the setup broadcast alone (nothing averaged yet): nothing sent
    only_setup = [{"step": 0, "comm/bytes/setup": str(P), "comm/bytes_total": str(P),
                   "comm/bytes_ddp_equivalent": "400.0"},
                  {"step": 1, "val/loss": "2.0"}]
    assert common.bytes_sent_by_step(only_setup) == {0: 0.0, 1: 0.0}


def test_carried_forward_not_interpolated_and_zero_before_the_first_round(tmp_path):
    rows = read(write_metrics(tmp_path / "metrics.csv", desloc_rows()))
    sent = common.bytes_sent_by_step(rows)
    assert sent[0] == 0.0  # before the first round
    assert sent[2] == sent[1] == 404.0  # a validation-only row between rounds: the last round's value
    assert sent[4] == sent[3] == 1608.0  # a step with only a training row
    assert sent[6] == sent[5]  # a row after the last round
    assert sorted(sent) == list(range(7))


def test_steps_without_any_row_are_filled(tmp_path):
    rows = [r for r in desloc_rows() if r["step"] not in (2, 4)]  # nothing at all logged at steps 2 and 4
    sent = common.bytes_sent_by_step(read(write_metrics(tmp_path / "metrics.csv", rows)))
    assert sent == DESLOC_BY_STEP


def test_rows_at_one_step_the_last_logged_wins():
    # a sync round and, at the same step, a checkpoint's consensus round logged right after it
    rows = [ledger(3, setup=P, params=P, control=4, ddp_equivalent=4 * P),
            ledger(3, setup=P, params=2 * P, control=4, ddp_equivalent=4 * P),
            {"val/loss": 1.0, "step": 4}]
    assert common.bytes_sent_by_step(rows) == {0: 0.0, 1: 0.0, 2: 0.0, 3: 804.0, 4: 804.0}


def test_ddp_one_gradient_per_step_taken(tmp_path):
    rows = read(write_metrics(tmp_path / "metrics.csv", ddp_rows()))
    sent = common.bytes_sent_by_step(rows)
    # step t is the (t + 1)-th optimizer step: 400 bytes after the first, 3200 after the eighth
    assert sent == {t: 400.0 * (t + 1) for t in range(9)}
    assert sent[3] == 1600.0 and sent[7] == 3200.0
    no_grad = [r for r in rows if not r.get("model/grad_bytes_per_step")]
    assert common.bytes_sent_by_step(no_grad) == {}  # no ledger, no gradient size: unknown
    assert common.bytes_sent_by_step(no_grad, grad_bytes=10.0)[7] == 80.0
    assert common.bytes_sent_by_step([]) == {}


def test_a_single_implementation():
    assert common.bytes_sent_by_step is plot.bytes_sent_by_step
    for script in BENCHMARKS.glob("*.py"):  # nobody else reads the ledger columns of a metrics.csv
        assert "comm/bytes_total" not in script.read_text(), script.name


# --------------------------------------------------------------------------- its users
def test_gptrun_bytes_at_counts_steps(tmp_path):
    write_metrics(tmp_path / "run" / "version_0" / "metrics.csv", desloc_rows())
    m = gptrun.read_metrics(tmp_path / "run")
    # validations after optimizer steps 3 and 6, each paired with its clock row
    assert m.val == [(3, 1.7, 1.0, 1.2), (6, 1.5, 2.0, 2.5)]
    assert m.bytes_at(3) == 404.0  # not the round after step 4 (1608), and not the setup broadcast (804)
    assert m.bytes_at(6) == 2012.0
    assert m.bytes_at(0) == 0.0
    write_metrics(tmp_path / "ddp" / "version_0" / "metrics.csv", ddp_rows())
    d = gptrun.read_metrics(tmp_path / "ddp")
    assert [v[0] for v in d.val] == [4, 8]
    assert d.bytes_at(4) == 4 * P and d.bytes_at(8) == 8 * P


def test_quality_read_result(tmp_path):
    write_metrics(tmp_path / "des" / "version_0" / "metrics.csv", desloc_rows())
    res = quality.read_result(tmp_path / "des")
    assert res["final_val_loss"] == 1.5
    assert res["all_bytes"] == 2012.0  # 3P params + P eval + P exp_avg + 12 control, setup excluded
    assert res["sync_bytes"] == 3 * P + P  # params and states only
    assert res["bytes_by_category"]["setup"] == P
    write_metrics(tmp_path / "ddp" / "version_0" / "metrics.csv", ddp_rows())
    ddp = quality.read_result(tmp_path / "ddp")
    assert ddp["all_bytes"] == ddp["sync_bytes"] == 8 * P  # 8 steps: the clock row at step 8 adds nothing


def test_plot_read_run(tmp_path):
    run = plot.read_run(write_metrics(tmp_path / "des" / "metrics.csv", desloc_rows()))
    assert run.has_ledger and run.steps == [2, 5]
    assert run.bytes_sent == [404.0, 2012.0]
    ddp = plot.read_run(write_metrics(tmp_path / "ddp" / "metrics.csv", ddp_rows()))
    assert not ddp.has_ledger and ddp.bytes_sent == [4 * P, 8 * P]
    bare = [r for r in ddp_rows() if "model/grad_bytes_per_step" not in r]
    run = plot.read_run(write_metrics(tmp_path / "bare" / "metrics.csv", bare))
    assert all(math.isnan(b) for b in run.bytes_sent)


@pytest.mark.parametrize("value", ["804.0", 804.0, "804"])
def test_cell_types(value):
    rows = [{"step": "1", "comm/bytes_total": value, "comm/bytes/setup": "400.0"}, {"step": 2, "val/loss": ""}]
    assert common.bytes_sent_by_step(rows) == {0: 0.0, 1: 404.0, 2: 404.0}
