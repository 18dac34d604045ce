"""A callback that writes what each rank holds, for tests that run a training script as a subprocess
(``--trainer.callbacks+=...`` with ``tests/`` on ``PYTHONPATH``) and compare the ranks afterwards.

``<out_dir>/step1_rank<r>.pt`` after the first optimizer step (before any average when
``param_sync_every > 1``) and ``<out_dir>/end_rank<r>.pt`` in ``on_fit_end``, which Lightning calls after
the strategy's ``on_train_end`` (the end-of-fit consensus), so it sees what the user gets. Each holds:

* ``params``: every parameter by its first name, detached copies;
* ``shared``: the groups of parameter names that are one tensor (tied weights), each with whether the
  names resolve to the same ``Parameter`` object and to the same storage (``data_ptr``);
* ``float_buffer_numel`` / ``float_buffer_bytes`` / ``buffer_bytes``: the module's buffers (DES-LOC
  averages the floating ones with the parameters and broadcasts all of them at setup);
* ``ledger``: the strategy's bytes and rounds per category and its DDP-equivalent bytes (``end`` only,
  empty under a strategy without a ledger).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def _snapshot(pl_module: pl.LightningModule) -> dict[str, Any]:
    by_storage: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, p in pl_module.named_parameters(remove_duplicate=False):
        by_storage.setdefault(p.data_ptr(), []).append((name, p))
    shared = []
    for group in by_storage.values():
        if len(group) > 1:
            first = group[0][1]
            shared.append({
                "names": sorted(name for name, _ in group),
                "same_object": all(p is first for _, p in group),
                "same_storage": all(p.data_ptr() == first.data_ptr() for _, p in group),
            })
    buffers = list(pl_module.buffers())
    floating = [b for b in buffers if b.is_floating_point()]
    return {
        "params": {name: p.detach().clone() for name, p in pl_module.named_parameters()},
        "shared": shared,
        "float_buffer_numel": sum(b.numel() for b in floating),
        "float_buffer_bytes": sum(b.numel() * b.element_size() for b in floating),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
    }


class DumpRankState(Callback):
    """Write each rank's parameters, tied groups and ledger after step 1 and at the end of fit (module docstring)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def _write(self, trainer: pl.Trainer, what: str, state: dict[str, Any]) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(state, os.path.join(self.out_dir, f"{what}_rank{trainer.global_rank}.pt"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self._write(trainer, "step1", _snapshot(pl_module))

    def on_fit_end(self, trainer, pl_module) -> None:
        state = _snapshot(pl_module)
        ledger = getattr(trainer.strategy, "ledger", None)
        state["ledger"] = {} if ledger is None else {
            "bytes": dict(ledger.bytes),
            "rounds_by_category": dict(ledger.rounds_by_category),
            "ddp_equivalent_bytes": ledger.ddp_equivalent_bytes,
        }
        self._write(trainer, "end", state)
