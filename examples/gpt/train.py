"""Train the tiny GPT on the Python standard library's source with LightningCLI.

    python examples/gpt/train.py fit --config configs/gpt-tiny-desloc.yaml
    python examples/gpt/train.py fit --config configs/gpt-tiny-ddp.yaml
    python examples/gpt/train.py fit --config configs/gpt-tiny-local-adam.yaml
    python examples/gpt/train.py fit --config configs/gpt-tiny-desloc.yaml --print_config

The three configs differ only in ``trainer.strategy``. The model and data module are plain Lightning;
``import lightning_desloc`` is what makes ``strategy: desloc`` (a string) resolvable, and a
``class_path: lightning_desloc.DeslocStrategy`` block works with or without it.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning_desloc  # noqa: E402,F401  registers the "desloc*" strategy strings
from data import StdlibDataModule  # noqa: E402
from model import GPTLightningModule  # noqa: E402


class GPTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One context length for both: the data module cuts blocks of it, the model's position table has it.
        parser.link_arguments("data.block_size", "model.block_size")


def main(args=None, run: bool = True) -> GPTCLI:
    """``args``: a list like ``sys.argv[1:]`` (default: the command line); ``run=False`` only builds the objects."""
    return GPTCLI(GPTLightningModule, StdlibDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


def report_bytes(cli: GPTCLI) -> None:
    """One line on rank 0 after ``fit``: what this rank sent against what DDP would have sent."""
    trainer = cli.trainer
    ledger = getattr(trainer.strategy, "ledger", None)
    if trainer.global_rank != 0 or ledger is None or not ledger.ddp_equivalent_bytes:
        return
    print(
        f"DES-LOC: {ledger.compared_bytes / 1e6:.1f} MB sent per rank in {ledger.rounds} collective rounds; "
        f"DDP would have all-reduced {ledger.ddp_equivalent_bytes / 1e6:.1f} MB: {ledger.ratio_vs_ddp:.1f}x fewer bytes "
        f"({ledger.bytes_saved / 1e6:.1f} MB saved)"
    )


if __name__ == "__main__":
    report_bytes(main())
