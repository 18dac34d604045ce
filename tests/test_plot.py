"""``python -m lightning_desloc.plot``: reading CSVLogger logs and writing the PNGs, on hand-written fixtures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from lightning_desloc.plot import find_metrics_csv, label_from_config, main, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
G = 1000.0  # gradient bytes per step in the fixtures


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for r in rows for k in r} | {"step"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def ledger_run(k: int, state_every: int, steps: int = 40, val_every: int = 10) -> list[dict]:
    """Rows shaped like the GPT example's: grad bytes once, train loss, ledger rows at syncs, val rows."""
    rows: list[dict] = [{"model/grad_bytes_per_step": G, "step": 0}]
    params = states = 0.0
    for s in range(1, steps + 1):  # optimizer step s is logged at Lightning step s - 1
        rows.append({"train/loss": 5.0 - s / steps, "step": s - 1, "epoch": 0})
        if s % k == 0:
            params += G
            states += G if s % state_every == 0 else 0
            total = G + params + states  # setup broadcast + syncs
            rows.append({
                "comm/bytes/setup": G, "comm/bytes/params": params, "comm/bytes/state/exp_avg": states,
                "comm/bytes_total": total, "step": s - 1,
            })  # fmt: skip
        if s % val_every == 0:
            rows.append({"val/loss": 4.0 - s / (2 * steps), "val/ppl": math.exp(4.0 - s / (2 * steps)), "step": s - 1})
    return rows


def ddp_run(steps: int = 40, val_every: int = 10) -> list[dict]:
    rows: list[dict] = [{"model/grad_bytes_per_step": G, "step": 0}]
    for s in range(1, steps + 1):
        rows.append({"train/loss": 5.0 - s / steps, "step": s - 1, "epoch": 0})
        if s % val_every == 0:
            rows.append({"val/loss": 3.9 - s / (2 * steps), "step": s - 1})
    return rows


CONFIG = """trainer:
  strategy:
    class_path: lightning_desloc.DeslocStrategy
    init_args:
      param_sync_every: {k}
      state_sync_every: {state}
"""


@pytest.fixture
def logs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "runs"
    desloc = write_metrics(root / "desloc" / "version_0" / "metrics.csv", ledger_run(k=4, state_every=12))
    (desloc.parent / "config.yaml").write_text(CONFIG.format(k=4, state="null"))
    local = write_metrics(root / "local-adam" / "version_3" / "metrics.csv", ledger_run(k=4, state_every=4))
    (local.parent / "config.yaml").write_text(CONFIG.format(k=4, state=4))
    # an older, shorter version next to it must not be picked
    write_metrics(root / "local-adam" / "version_1" / "metrics.csv", ledger_run(k=4, state_every=4, steps=10))
    ddp = write_metrics(root / "ddp" / "version_0" / "metrics.csv", ddp_run())
    (ddp.parent / "config.yaml").write_text("trainer:\n  strategy: ddp\n")
    return {"desloc": root / "desloc", "local-adam": root / "local-adam", "ddp": root / "ddp"}


def test_find_metrics_csv_picks_newest_version(logs):
    assert find_metrics_csv(logs["local-adam"]).parent.name == "version_3"
    assert find_metrics_csv(logs["ddp"] / "version_0") == logs["ddp"] / "version_0" / "metrics.csv"
    with pytest.raises(FileNotFoundError):
        find_metrics_csv(logs["ddp"].parent / "missing")


def test_read_run_bytes(logs):
    desloc = read_run(logs["desloc"])
    assert desloc.label == "DES-LOC (K_x=4)" and desloc.has_ledger
    assert desloc.steps == [9, 19, 29, 39]
    # by optimizer step 10: params at 4 and 8 (2G); exp_avg every 12: none yet. Setup excluded.
    assert desloc.bytes_sent[0] == 2 * G
    assert desloc.bytes_sent[-1] == 10 * G + 3 * G  # 10 param rounds, exp_avg at 12, 24, 36
    local = read_run(logs["local-adam"])
    assert local.label == "Local Adam (K=4)" and local.steps[-1] == 39
    assert local.bytes_sent[-1] == 20 * G
    ddp = read_run(logs["ddp"])
    assert ddp.label == "DDP" and not ddp.has_ledger
    assert ddp.bytes_sent == [G * 10, G * 20, G * 30, G * 40]
    assert ddp.final_val_loss == pytest.approx(3.4)


def test_read_run_without_grad_bytes_needs_the_option(tmp_path):
    rows = [r for r in ddp_run() if "model/grad_bytes_per_step" not in r]
    path = write_metrics(tmp_path / "metrics.csv", rows)
    assert all(math.isnan(b) for b in read_run(path).bytes_sent)
    assert read_run(path, grad_bytes=5.0).bytes_sent[0] == 50.0
    assert read_run(path).label == tmp_path.name  # no config.yaml: the directory name


def test_read_run_without_val_loss_fails(tmp_path):
    path = write_metrics(tmp_path / "metrics.csv", [{"train/loss": 1.0, "step": 0}])
    with pytest.raises(ValueError, match="validation loss"):
        read_run(path)


def test_label_from_config(tmp_path):
    cases = {
        "trainer:\n  strategy: desloc\n": "DES-LOC (K_x=256)",
        "trainer:\n  strategy: ddp_spawn\n": "DDP_SPAWN",
        CONFIG.format(k=8, state=24): "DES-LOC (K_x=8)",
        CONFIG.format(k=8, state=8): "Local Adam (K=8)",
        CONFIG.format(k=8, state="null") + "      state_policy: keep_local\n": "keep_local (K_x=8)",
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DDPStrategy\n": "DDP",
    }
    for i, (text, label) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        assert label_from_config(path) == label, text
    assert label_from_config(tmp_path / "none.yaml") is None


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, f"{path} is only {len(data)} bytes"


def test_plot_command_writes_pngs(logs, tmp_path, capsys):
    out = tmp_path / "plots"
    written = main([str(logs[n]) for n in ("desloc", "local-adam", "ddp")] + ["--out", str(out)])
    assert sorted(p.name for p in written) == ["val_loss_vs_bytes.png", "val_loss_vs_step.png"]
    for path in written:
        check_png(path)
    text = capsys.readouterr().out
    for label in ("DES-LOC (K_x=4)", "Local Adam (K=4)", "DDP"):
        assert label in text


def test_plot_command_labels_and_single_csv(logs, tmp_path):
    csv_path = find_metrics_csv(logs["ddp"])
    written = main([str(csv_path), "--out", str(tmp_path / "one"), "--labels", "baseline", "--title", "one run"])
    for path in written:
        check_png(path)
    with pytest.raises(SystemExit):
        main([str(csv_path), "--out", str(tmp_path / "x"), "--labels", "a", "b"])
