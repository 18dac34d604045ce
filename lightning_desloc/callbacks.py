"""Callbacks that show DES-LOC's communication savings while training.

``CommProgressBar`` adds, to whichever progress bar Lightning uses (TQDM or Rich), how many bytes this
rank has not had to send compared with DDP and the ratio, read from ``trainer.strategy.ledger``::

    Trainer(strategy="desloc", callbacks=[CommProgressBar()])
    # Epoch 0:  31%|███  | 290/925 [00:41<01:31, train/loss=1.84, saved_MB=70.3, x_less=16.0]

Under a strategy without a ledger (plain ``ddp``, single device) it does nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


class CommProgressBar(Callback):
    """Show ``strategy.ledger.bytes_saved`` (and the ratio to DDP) in the progress bar.

    The values are logged with ``pl_module.log(..., prog_bar=True, logger=False)``: they appear next to the
    loss in Lightning's own progress bar and nowhere else (the strategy already logs the full ledger,
    ``comm/...``, to the loggers at every sync round). Nothing is communicated: each rank shows its own
    ledger, and the progress bar is rank 0's.

    Args:
        unit: ``"B"``, ``"KB"``, ``"MB"`` or ``"GB"`` (decimal) for the saved bytes; the key is
            ``saved_<unit>``.
        show_ratio: also show ``x_less``, how many times fewer bytes than DDP this rank sent.
    """

    def __init__(self, unit: str = "MB", show_ratio: bool = True) -> None:
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
        self.unit = unit
        self.show_ratio = show_ratio

    @staticmethod
    def ledger_of(trainer: "pl.Trainer") -> Optional[Any]:
        """The strategy's communication ledger, or ``None`` when the strategy keeps none (e.g. DDP)."""
        ledger = getattr(trainer.strategy, "ledger", None)
        return ledger if ledger is not None and hasattr(ledger, "bytes_saved") else None

    def progress_values(self, trainer: "pl.Trainer") -> dict[str, float]:
        """What goes into the progress bar now; empty without a ledger."""
        ledger = self.ledger_of(trainer)
        if ledger is None:
            return {}
        values = {f"saved_{self.unit}": round(ledger.bytes_saved / _UNITS[self.unit], 1)}
        ratio = ledger.ratio_vs_ddp
        if self.show_ratio and ratio != float("inf"):
            values["x_less"] = round(ratio, 1)
        return values

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for name, value in self.progress_values(trainer).items():
            pl_module.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False, sync_dist=False)
