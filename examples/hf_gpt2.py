"""A HuggingFace ``transformers`` GPT-2 in a plain LightningModule, trained with LightningCLI on the GPT
example's corpus (the Python standard library's source, bytes as tokens, streamed with litdata).

    pip install -e ".[examples]"     # transformers (also in .[dev])
    python examples/hf_gpt2.py fit --config configs/hf-gpt2-tiny-desloc.yaml
    python examples/hf_gpt2.py fit --config configs/hf-gpt2-tiny-ddp.yaml
    python examples/hf_gpt2.py fit --config configs/hf-gpt2-tiny-local-adam.yaml

The model is built from a small ``GPT2Config``, not downloaded: ``GPT2LMHeadModel(config)`` initialises
its own weights, with the output head tied to the token embedding as GPT-2 has it
(``lm_head.weight is transformer.wte.weight``). ``module.parameters()`` yields that tensor once, so the
optimizer holds it once and DES-LOC averages it once per round; the tie survives the averaging, which
copies the mean back into the same storage. With the configs' shape (4 layers, 4 heads, width 64,
context 128, vocabulary 256) it has the GPT example's 224,640 parameters.

The data module and its preparation are the GPT example's (``examples/gpt/data.py``); nothing here
knows about DES-LOC: the configs choose the strategy.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from torchmetrics.text import Perplexity
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt"))

import lightning_desloc  # noqa: E402,F401  registers the "desloc*" strategy strings
from data import VOCAB_SIZE, StdlibDataModule  # noqa: E402  the GPT example's corpus and data module
from train import report_bytes  # noqa: E402  the GPT example's end-of-fit bytes line


def warmup_cosine(step: int, warmup_steps: int, total_steps: Optional[int], min_lr_ratio: float) -> float:
    """LR factor: linear warm-up over ``warmup_steps``, then cosine down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class HFGPT2LightningModule(pl.LightningModule):
    """Next-token prediction with ``transformers.GPT2LMHeadModel`` and AdamW (linear warm-up, cosine decay).

    Logs what the GPT example's module logs, under the same names, so ``python -m lightning_desloc.plot``
    reads both: ``train/loss``, ``train/tokens_per_s``, ``val/loss``, ``val/ppl`` and once
    ``model/grad_bytes_per_step`` (one full gradient: what DDP all-reduces per step; the tied
    embedding/head counted once, as DDP and DES-LOC both send it once).

    Args:
        vocab_size: token ids are ``0 .. vocab_size - 1`` (256: bytes).
        block_size: context length (``GPT2Config.n_positions``); linked to the data module's.
        n_layer, n_head, n_embd: GPT-2's shape.
        dropout: ``resid_pdrop``, ``embd_pdrop`` and ``attn_pdrop`` alike.
        lr, weight_decay, betas: AdamW; no weight decay on biases, LayerNorms and the position table.
        warmup_steps: linear warm-up length in optimizer steps.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at ``trainer.max_steps``.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 64,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            tie_word_embeddings=True,
            # GPT-2's default ids (50256) lie outside a byte vocabulary; the corpus has no special tokens
            bos_token_id=None,
            eos_token_id=None,
        )
        self.model = GPT2LMHeadModel(config)
        self.val_ppl = Perplexity()
        self._last_step_time: Optional[float] = None

    def forward(self, idx: Tensor) -> Tensor:
        """``idx``: (B, T) token ids -> logits (B, T, vocab_size)."""
        return self.model(input_ids=idx).logits

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        # the data module's targets are already shifted by one, so the loss is taken here rather than by
        # passing labels= (which would shift them once more)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))

    def on_train_start(self) -> None:
        grad_bytes = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
        for logger in self.loggers:
            logger.log_metrics({"model/grad_bytes_per_step": float(grad_bytes)}, step=self.global_step)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)  # this rank's own loss: nothing crosses the link
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/tokens_per_s", x.numel() * self.trainer.world_size / (now - self._last_step_time))
        self._last_step_time = now
        return loss

    def on_validation_epoch_start(self) -> None:
        self._last_step_time = None  # validation time is not a slow training step

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", self._loss(logits, y), sync_dist=True, prog_bar=True)
        self.val_ppl.update(logits.float(), y)
        self.log("val/ppl", self.val_ppl)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # the tied embedding/head appears once, as transformer.wte.weight
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and ".wpe." not in name else no_decay).append(p)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class HFGPT2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one context length for both: the data module cuts blocks of it, GPT-2's position table has it
        parser.link_arguments("data.block_size", "model.block_size")


def main(args=None, run: bool = True) -> HFGPT2CLI:
    """``args``: a list like ``sys.argv[1:]`` (default: the command line); ``run=False`` only builds the objects."""
    return HFGPT2CLI(HFGPT2LightningModule, StdlibDataModule, args=args, run=run,
                     save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    report_bytes(main())
