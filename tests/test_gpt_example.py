"""The GPT example: configs, the litdata corpus, and real 2-process runs (gloo) of every config.

The end-to-end runs start ``python examples/gpt/train.py fit --config ...`` as a subprocess, exactly
as a user does (Lightning's default ``popen`` launcher then starts the second rank), on a tiny corpus
written into ``tmp_path``.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parents[1]
GPT_DIR = REPO / "examples" / "gpt"
CONFIGS = {name: REPO / "configs" / f"gpt-tiny-{name}.yaml" for name in ("desloc", "local-adam", "ddp")}
sys.path.insert(0, str(GPT_DIR))

from data import StdlibDataModule, collect_sources, file_blocks, num_blocks, prepare_corpus  # noqa: E402

import lightning_desloc  # noqa: E402
from lightning_desloc import DeslocStrategy  # noqa: E402
from lightning_desloc.callbacks import CommProgressBar  # noqa: E402
from lightning_desloc.ledger import CommLedger  # noqa: E402

BLOCK = 16


# ----------------------------------------------------------------------------------------------- helpers
def write_corpus(root: Path, n_files: int = 24, seed: int = 0) -> dict[str, int]:
    """Small ``.py`` files of random sizes (plus a skipped ``test/`` dir); returns {relative path: size}."""
    rng = random.Random(seed)
    sizes = {}
    for i in range(n_files):
        rel = f"pkg{i % 3}/mod_{i:02d}.py"
        text = "".join(rng.choice("abcdefghij =()\n") for _ in range(rng.randint(60, 900)))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        sizes[rel] = len(text.encode())
    (root / "test").mkdir(exist_ok=True)
    (root / "test" / "test_ignored.py").write_text("x = 1\n" * 50)  # the stdlib's test suite is skipped
    (root / "notes.txt").write_text("not python\n")
    return sizes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    (csv_path,) = log_dir.rglob("metrics.csv")
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus) -> Path:
    data_dir = tmp_path_factory.mktemp("data") / "shards"
    prepare_corpus(str(data_dir), str(corpus[0]), max_bytes=10**9, block_size=BLOCK, val_every=4)
    return data_dir


# ----------------------------------------------------------------------------------------------- configs
def _without_strategy(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    config["trainer"].pop("strategy")
    config["trainer"]["logger"]["init_args"].pop("name")
    return config


def test_configs_differ_only_in_strategy():
    base = _without_strategy(CONFIGS["desloc"])
    for name in ("local-adam", "ddp"):
        assert _without_strategy(CONFIGS[name]) == base, name
    strategies = {name: yaml.safe_load(p.read_text())["trainer"]["strategy"] for name, p in CONFIGS.items()}
    assert strategies["ddp"] == "ddp"
    assert strategies["desloc"]["class_path"] == "lightning_desloc.DeslocStrategy"
    local = strategies["local-adam"]["init_args"]
    assert local["state_sync_every"] == local["param_sync_every"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_builds_the_trainer(name):
    from train import main

    cli = main(["--config", str(CONFIGS[name])], run=False)
    strategy = cli.trainer.strategy
    assert cli.trainer.num_devices == 2 and cli.trainer.max_steps == 300
    assert cli.model.hparams.block_size == cli.datamodule.block_size  # linked
    assert any(isinstance(c, CommProgressBar) for c in cli.trainer.callbacks)
    if name == "ddp":
        assert type(strategy).__name__ == "DDPStrategy"
        return
    assert isinstance(strategy, DeslocStrategy)
    assert strategy.schedule.param_sync_every == 16
    periods = strategy.schedule.state_sync_every
    if name == "desloc":  # paper defaults: 3 K_x and 6 K_x
        assert (periods["exp_avg"], periods["exp_avg_sq"]) == (48, 96)
    else:
        assert (periods["exp_avg"], periods["exp_avg_sq"]) == (16, 16)


def test_plain_string_strategy_uses_paper_defaults():
    from train import main

    cli = main(["--config", str(CONFIGS["desloc"]), "--trainer.strategy=desloc"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeslocStrategy) and strategy._start_method == "popen"
    assert strategy.schedule.param_sync_every == 256
    assert strategy.schedule.state_sync_every["exp_avg"] == 768
    assert strategy.schedule.state_sync_every["exp_avg_sq"] == 1536


def test_print_config_and_help_show_every_desloc_argument(capsys):
    from train import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS["desloc"]), "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]["init_args"]
    expected = [p for p in inspect.signature(DeslocStrategy.__init__).parameters if p != "self"]
    assert list(init_args) == expected
    assert init_args["param_sync_every"] == 16 and init_args["state_sync_every"] is None
    assert init_args["start_method"] == "popen"

    # the types and defaults: --trainer.strategy.help
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.strategy.help", "lightning_desloc.DeslocStrategy"])
    flat = " ".join(capsys.readouterr().out.split())
    for name in expected:
        assert f"--trainer.strategy.{name}" in flat
    entry = flat.split("--trainer.strategy.param_sync_every PARAM_SYNC_EVERY ")[-1].split("--trainer.strategy.")[0]
    assert re.search(r"\(type: [^)]*int[^)]*, default: 256\)", entry), entry
    assert "Literal['consensus', 'local'], default: consensus" in flat


# ----------------------------------------------------------------------------------------------- data
def test_collect_sources_caps_bytes_and_splits_by_file(corpus):
    root, sizes = corpus
    train, val = collect_sources(str(root), max_bytes=10**9, val_every=4)
    ordered = sorted(sizes)
    assert [os.path.relpath(p, root) for p in sorted(train + val)] == ordered  # test/ and .txt skipped
    assert [os.path.relpath(p, root) for p in val] == ordered[3::4]
    cap = sum(sizes[r] for r in ordered[:5])
    train, val = collect_sources(str(root), max_bytes=cap, val_every=4)
    assert len(train) + len(val) == 5


def test_prepare_writes_the_expected_blocks(prepared, corpus):
    root, sizes = corpus
    manifest = json.loads((prepared / "corpus.json").read_text())
    ordered = sorted(sizes)
    val_files = ordered[3::4]
    train_files = [r for r in ordered if r not in val_files]
    assert manifest["train"]["bytes"] == sum(sizes[r] for r in train_files)
    assert manifest["train"]["blocks"] == sum(num_blocks(sizes[r], BLOCK) for r in train_files)
    assert manifest["val"]["blocks"] == sum(num_blocks(sizes[r], BLOCK) for r in val_files)
    # a block is the file's bytes (then the separator), BLOCK + 1 tokens at a time
    first = next(file_blocks(str(root / ordered[0]), BLOCK))
    assert bytes(first) == (root / ordered[0]).read_bytes()[: BLOCK + 1]
    assert (prepared / "train" / "index.json").exists() and (prepared / "val" / "index.json").exists()


def _stream_worker(rank: int, world_size: int, port: int, data_dir: str, batch_size: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        dm = StdlibDataModule(data_dir=data_dir, block_size=BLOCK, batch_size=batch_size, shuffle=True)
        dm.setup("fit")
        result = {}
        for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
            blocks, tokens = [], 0
            for x, y in loader:
                assert x.dtype == torch.long and x.shape[1] == BLOCK and torch.equal(x[:, 1:], y[:, :-1])
                tokens += x.numel()
                blocks += [x[i].tolist() + [int(y[i, -1])] for i in range(x.shape[0])]
            result[split] = {"tokens": tokens, "blocks": blocks, "batches": len(loader)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_each_rank_streams_its_own_part(prepared, corpus, tmp_path):
    root, sizes = corpus
    world_size, batch_size = 2, 3
    mp.spawn(_stream_worker, args=(world_size, free_port(), str(prepared), batch_size, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]

    ordered = sorted(sizes)
    files = {"val": ordered[3::4]}
    files["train"] = [r for r in ordered if r not in files["val"]]
    for split, names in files.items():
        all_blocks = [tuple(b) for r in names for b in file_blocks(str(root / r), BLOCK)]
        # litdata gives every rank the same number of whole batches (drop_last under torch.distributed)
        per_rank = len(all_blocks) // world_size // batch_size * batch_size
        for rank in ranks:
            assert rank[split]["tokens"] == per_rank * BLOCK, split  # inputs only: BLOCK of the BLOCK + 1 tokens
            assert len(rank[split]["blocks"]) == per_rank
            assert rank[split]["batches"] == per_rank // batch_size
        seen = [set(map(tuple, rank[split]["blocks"])) for rank in ranks]
        assert not seen[0] & seen[1], f"{split}: the ranks overlap"
        assert seen[0] | seen[1] <= set(all_blocks)


# ----------------------------------------------------------------------------------------------- callback
def test_comm_progress_bar_text():
    from types import SimpleNamespace

    bar = CommProgressBar()
    assert bar.ledger_of(SimpleNamespace(strategy=SimpleNamespace())) is None  # DDP: no ledger, nothing shown
    ledger = CommLedger()
    ledger.record({"setup": 4_000_000})
    ledger.add_ddp_equivalent(1_000_000, steps=15)
    assert bar.progress_text(ledger) is None  # no average yet: a ratio of "everything" means nothing
    ledger.add_ddp_equivalent(1_000_000)
    ledger.record({"params": 1_000_000, "control": 4})  # step 16: the first average, 1 MB (+ 4 B of signals)
    assert bar.progress_text(ledger) == "1.0 MB · 16.0x < DDP"  # 16 MB of DDP gradients / 1.000004 MB sent
    ledger.add_ddp_equivalent(1_000_000, steps=8)  # local steps: the text waits for the next round
    assert bar.progress_text(ledger) == "1.0 MB · 16.0x < DDP"
    ledger.record({"params": 1_000_000})
    assert bar.progress_text(ledger) == "2.0 MB · 12.0x < DDP"  # 24 MB / 2 MB
    assert CommProgressBar(unit="KB", show_ratio=False).progress_text(ledger) == "2000.0 KB"
    with pytest.raises(ValueError, match="unit"):
        CommProgressBar(unit="MiB")


# ----------------------------------------------------------------------------------------------- real runs
STEPS = 6


def _train(config: Path, data_dir: Path, log_dir: Path, *extra: str, source_dir: Path | None = None):
    cmd = [
        sys.executable, str(GPT_DIR / "train.py"), "fit", "--config", str(config),
        f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1", f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--data.data_dir={data_dir}", f"--data.block_size={BLOCK}", "--data.batch_size=4",
        "--data.val_every=4", "--model.n_layer=1", "--model.n_embd=32", "--model.warmup_steps=2",
        *extra,
    ]  # fmt: skip
    if source_dir is not None:
        cmd.append(f"--data.source_dir={source_dir}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared) -> dict[str, Path]:
    """One short 2-process run per config (K_x = 2 for the DES-LOC ones, so that syncs happen)."""
    logs = tmp_path_factory.mktemp("logs")
    extra = {
        "desloc": ["--trainer.strategy.init_args.param_sync_every=2"],
        "local-adam": ["--trainer.strategy.init_args.param_sync_every=2", "--trainer.strategy.init_args.state_sync_every=2"],
        "ddp": [],
    }
    out = {}
    for name, config in CONFIGS.items():
        proc = _train(config, prepared, logs, *extra[name])
        (logs / f"{name}.out").write_text(proc.stdout + proc.stderr)
        out[name] = logs / name
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_runs_and_logs(runs, name):
    rows = read_metrics(runs[name])
    assert len(column(rows, "val/loss")) == 2 and len(column(rows, "val/ppl")) == 2
    assert all(l > 0 for l in column(rows, "train/loss"))
    assert column(rows, "train/tokens_per_s") and min(column(rows, "train/tokens_per_s")) > 0
    grad_bytes = column(rows, "model/grad_bytes_per_step")
    assert len(grad_bytes) == 1 and grad_bytes[0] > 0
    # Lightning's own progress bar carries the loss, and the saved bytes where there is a ledger
    output = (runs[name].parent / f"{name}.out").read_text()
    assert "train/loss=" in output
    if name == "ddp":
        assert not any(k.startswith("comm/") for k in rows[0])
        assert "comm=" not in output
        return
    assert "x < DDP" in output and "comm=" in output
    total = column(rows, "comm/bytes_total")
    assert total == sorted(total) and len(total) >= STEPS // 2  # one row per sync round at least
    last = rows[-1] if rows[-1].get("comm/bytes_total") else [r for r in rows if r.get("comm/bytes_total")][-1]
    g = grad_bytes[0]
    assert float(last["comm/bytes_ddp_equivalent"]) == g * STEPS
    assert float(last["comm/bytes/setup"]) >= g  # rank 0's weights broadcast
    params = float(last["comm/bytes/params"])
    assert params == g * (STEPS // 2)  # K_x = 2 (the model has no floating buffers)
    states = {k: float(v) for k, v in last.items() if k.startswith("comm/bytes/state/") and v}
    if name == "local-adam":
        assert states == {"comm/bytes/state/exp_avg": params, "comm/bytes/state/exp_avg_sq": params}
    else:  # DES-LOC: exp_avg every 6 steps, exp_avg_sq every 12 -> once and never in 6 steps
        assert states == {"comm/bytes/state/exp_avg": g}


def test_plain_string_strategy_run_prepares_data(tmp_path, corpus):
    """``strategy: desloc`` from the command line, and prepare_data tokenising a missing data dir on rank 0."""
    data_dir = tmp_path / "fresh"
    _train(CONFIGS["desloc"], data_dir, tmp_path / "logs", "--trainer.strategy=desloc",
           "--trainer.enable_progress_bar=false", source_dir=corpus[0])  # fmt: skip
    assert json.loads((data_dir / "corpus.json").read_text())["block_size"] == BLOCK
    rows = read_metrics(tmp_path / "logs")
    last = [r for r in rows if r.get("comm/bytes_total")][-1]
    # K_x = 256 > 6 steps: no scheduled sync, only the end-of-training consensus average
    assert float(last["comm/bytes/params"]) == column(rows, "model/grad_bytes_per_step")[0]
    assert "comm/bytes/state/exp_avg" not in last or not last["comm/bytes/state/exp_avg"]


def test_plot_command_on_real_runs(runs, tmp_path):
    out = tmp_path / "plots"
    cmd = [sys.executable, "-m", "lightning_desloc.plot", *(str(runs[n]) for n in CONFIGS), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for line in ("DES-LOC (K_x=2)", "Local Adam (K=2)", "DDP"):
        assert line in proc.stdout
    for png in ("val_loss_vs_step.png", "val_loss_vs_bytes.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_tensorboard_logger_receives_the_ledger(prepared, tmp_path):
    """The same run with a TensorBoard logger: the ledger's scalars land in the event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    _train(CONFIGS["desloc"], prepared, logs, "--trainer.enable_progress_bar=false",
           "--trainer.strategy.init_args.param_sync_every=2",
           "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
           f"--trainer.logger.init_args.save_dir={logs}", "--trainer.logger.init_args.name=desloc")  # fmt: skip
    (event_file,) = logs.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"val/loss", "val/ppl", "comm/bytes/params", "comm/ratio_vs_ddp"} <= set(scalars)
    grad_bytes = events.Scalars("model/grad_bytes_per_step")[0].value
    # K_x = 2 over STEPS steps: STEPS // 2 parameter averages of one model size each (float32 exact here)
    assert events.Scalars("comm/bytes/params")[-1].value == grad_bytes * (STEPS // 2)
