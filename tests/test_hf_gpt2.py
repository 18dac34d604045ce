"""The HuggingFace GPT-2 example (``examples/hf_gpt2.py``): configs, the model's tied weights and a real
2-process DES-LOC run (gloo, the default ``popen`` launcher, ``python examples/hf_gpt2.py fit ...`` as a
subprocess), whose ledger is checked against bytes counted by hand from GPT-2's shape.

Skipped without ``transformers`` (``pip install -e ".[examples]"``; ``.[dev]`` has it too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "hf_gpt2.py"
CONFIGS = {name: REPO / "configs" / f"hf-gpt2-tiny-{name}.yaml" for name in ("desloc", "local-adam", "ddp")}
GPT_CONFIG = REPO / "configs" / "gpt-tiny-desloc.yaml"
sys.path.insert(0, str(SCRIPT.parent))
sys.path.insert(0, str(SCRIPT.parent / "gpt"))

from data import prepare_corpus  # noqa: E402  the GPT example's corpus preparation

from lightning_desloc import DeslocStrategy  # noqa: E402

VOCAB, BLOCK, N_LAYER, N_EMBD = 256, 16, 1, 32
STEPS, K_X = 6, 2
TIED = ["model.lm_head.weight", "model.transformer.wte.weight"]


def gpt2_parameter_count(vocab: int, n_positions: int, n_layer: int, d: int) -> int:
    """GPT-2's parameters, each once: token and position tables, per block two LayerNorms (2d each),
    attention c_attn (d x 3d + 3d) and c_proj (d x d + d), MLP c_fc (d x 4d + 4d) and c_proj (4d x d + d),
    the final LayerNorm (2d). The LM head is the token table itself (tied): it adds nothing."""
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return vocab * d + n_positions * d + n_layer * per_block + 2 * d


# ----------------------------------------------------------------------------------------------- configs
def _without_strategy(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    config["trainer"].pop("strategy")
    config["trainer"]["logger"]["init_args"].pop("name")
    return config


def test_configs_differ_only_in_strategy_and_match_the_gpt_example():
    base = _without_strategy(CONFIGS["desloc"])
    for name in ("local-adam", "ddp"):
        assert _without_strategy(CONFIGS[name]) == base, name
    strategies = {name: yaml.safe_load(p.read_text())["trainer"]["strategy"] for name, p in CONFIGS.items()}
    assert strategies["ddp"] == "ddp"
    assert strategies["desloc"]["init_args"] == {"param_sync_every": 16, "state_sync_every": None,
                                                 "validate_on": "consensus"}
    local = strategies["local-adam"]["init_args"]
    assert local["state_sync_every"] == local["param_sync_every"] == 16
    # the same run as the GPT example's, but for the model class and where it logs
    gpt = _without_strategy(GPT_CONFIG)
    assert base["trainer"]["logger"]["init_args"].pop("save_dir") == "runs/hf-gpt2-tiny"
    gpt["trainer"]["logger"]["init_args"].pop("save_dir")
    assert base == gpt


def test_the_model_is_gpt2_with_tied_embeddings_and_the_gpt_examples_size():
    from hf_gpt2 import main
    from transformers import GPT2LMHeadModel

    cli = main(["--config", str(CONFIGS["desloc"])], run=False)
    model = cli.model.model
    assert isinstance(model, GPT2LMHeadModel)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert cli.model.hparams.block_size == cli.datamodule.block_size == model.config.n_positions == 128  # linked
    assert sum(p.numel() for p in cli.model.parameters()) == gpt2_parameter_count(VOCAB, 128, 4, 64) == 224_640
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeslocStrategy) and strategy.schedule.param_sync_every == 16
    periods = strategy.schedule.state_sync_every
    assert (periods["exp_avg"], periods["exp_avg_sq"]) == (48, 96)  # the paper's 3 K_x and 6 K_x


# ----------------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The GPT example's corpus (this interpreter's standard library), a small slice of it."""
    data_dir = tmp_path_factory.mktemp("hf-data") / "shards"
    prepare_corpus(str(data_dir), max_bytes=60_000, block_size=BLOCK, val_every=4)
    return data_dir


@pytest.fixture(scope="module")
def desloc_run(tmp_path_factory, prepared) -> Path:
    """6 steps of the desloc config on 2 processes with K_x = 2; each rank dumps its state (rank_state_dump)."""
    out = tmp_path_factory.mktemp("hf-run")
    dump = {"class_path": "rank_state_dump.DumpRankState", "init_args": {"out_dir": str(out / "dump")}}
    cmd = [
        sys.executable, str(SCRIPT), "fit", "--config", str(CONFIGS["desloc"]),
        f"--trainer.strategy.init_args.param_sync_every={K_X}",
        f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}", f"--trainer.callbacks+={json.dumps(dump)}",
        f"--data.data_dir={prepared}", f"--data.block_size={BLOCK}", "--data.batch_size=4", "--data.val_every=4",
        f"--model.n_layer={N_LAYER}", f"--model.n_embd={N_EMBD}", "--model.warmup_steps=2",
    ]  # fmt: skip
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out / "output.txt").write_text(proc.stdout + proc.stderr)
    return out


def _load(run: Path, what: str) -> list[dict]:
    return [torch.load(run / "dump" / f"{what}_rank{r}.pt") for r in range(2)]


def test_ranks_train_apart_and_end_equal_with_the_head_still_tied(desloc_run):
    step1, end = _load(desloc_run, "step1"), _load(desloc_run, "end")
    # after step 1 (K_x = 2: nothing averaged yet) each rank has taken its own step on its own data
    assert not torch.equal(step1[0]["params"][TIED[1]], step1[1]["params"][TIED[1]])
    # after fit every rank holds the consensus, tensor for tensor
    assert list(end[0]["params"]) == list(end[1]["params"])
    for name in end[0]["params"]:
        assert torch.equal(end[0]["params"][name], end[1]["params"][name]), name
    for rank in (*step1, *end):  # the head is the token embedding on every rank, before and after averaging
        assert rank["shared"] == [{"names": TIED, "same_object": True, "same_storage": True}]
        assert TIED[0] not in rank["params"]  # named_parameters() lists the tied tensor once


def test_ledger_bytes_are_the_schedules_counted_by_hand(desloc_run):
    end = _load(desloc_run, "end")
    model_bytes = gpt2_parameter_count(VOCAB, BLOCK, N_LAYER, N_EMBD) * 4  # float32; the tied tensor once
    assert model_bytes == 21_472 * 4
    for rank in end:
        assert sum(p.numel() for p in rank["params"].values()) * 4 == model_bytes
    ledger = end[0]["ledger"]
    assert end[1]["ledger"] == ledger  # both ranks took part in the same rounds
    got = ledger["bytes"]
    # the floating buffers go with each average: none in transformers 5 (the causal mask is built per
    # call), one float32 scalar per block in 4.x (attn.masked_bias, beside a bool mask that is only broadcast)
    float_buffers = end[0]["float_buffer_bytes"]
    assert got.get("buffers", 0) == (STEPS // K_X) * float_buffers
    assert got["setup"] == model_bytes + end[0]["buffer_bytes"]  # rank 0's weights broadcast once
    assert got["params"] == (STEPS // K_X) * model_bytes  # K_x = 2: averages after steps 2, 4, 6
    # exp_avg every 3 K_x = 6 steps: once; exp_avg_sq every 6 K_x = 12: never in 6 steps
    assert got["state/exp_avg"] == model_bytes and "state/exp_avg_sq" not in got
    # validation after step 3 averages the local parameters (step 6's validation follows an average:
    # nothing sent), and fit ends right after step 6's average: no end-of-fit round; a consensus for
    # validation averages the floating buffers under "eval" too
    assert got["eval"] == model_bytes + float_buffers
    assert ledger["ddp_equivalent_bytes"] == STEPS * model_bytes
    assert ledger["rounds_by_category"]["params"] == STEPS // K_X
    output = (desloc_run / "output.txt").read_text()
    assert "DES-LOC: " in output and "x fewer bytes" in output  # the GPT example's end-of-fit line
