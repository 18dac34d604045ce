"""A callback that shows DES-LOC's communication in the progress bar, in words a user reads at a glance.

``CommProgressBar`` adds one item to whichever progress bar Lightning uses (TQDM or Rich): what this rank
has sent and how many times less that is than DDP would have sent for the same steps, read from
``trainer.strategy.ledger``::

    Trainer(strategy="desloc", callbacks=[CommProgressBar()])
    # Epoch 0:  31%|███  | 290/925 [00:41<01:31, train/loss=1.84, comm=30.6 MB · 8.8x < DDP]

The item appears from the first parameter average on (before it the ratio only says that nothing has
been averaged yet) and changes only at averaging rounds: between two rounds the ratio would climb with
every local step and fall back at the round, a saw-tooth that says nothing. Exact numbers go to the
loggers (``comm/...``, logged by the strategy at every round), not here.

Nothing is logged and nothing is communicated: the callback extends the bar's own
``get_metrics`` (the hook Lightning documents for changing what a bar shows) with a string built from
host integers when the bar refreshes, so the training step creates no tensor for it. Each rank reads its
own ledger; the bar is rank 0's. Under a strategy without a ledger (plain ``ddp``, one device) it adds
nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


class CommProgressBar(Callback):
    """Show ``comm=<sent> · <ratio>x < DDP`` in the progress bar (see the module docstring).

    Args:
        unit: ``"B"``, ``"KB"``, ``"MB"`` or ``"GB"`` (decimal) for the bytes sent.
        show_ratio: also show how many times fewer bytes than DDP this rank sent.
        key: the progress bar item's name.
    """

    def __init__(self, unit: str = "MB", show_ratio: bool = True, key: str = "comm") -> None:
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
        self.unit, self.show_ratio, self.key = unit, show_ratio, key
        self._text: Optional[str] = None
        self._rounds_seen = -1

    @staticmethod
    def ledger_of(trainer: "pl.Trainer") -> Optional[Any]:
        """The strategy's communication ledger, or ``None`` when the strategy keeps none (e.g. DDP)."""
        ledger = getattr(trainer.strategy, "ledger", None)
        return ledger if ledger is not None and hasattr(ledger, "ratio_vs_ddp") else None

    def progress_text(self, ledger: Any) -> Optional[str]:
        """The item's text for ``ledger``: ``None`` before the first parameter average, then refreshed only
        when a round has run since the last call."""
        if ledger.rounds_by_category.get("params", 0) == 0:
            return None
        if ledger.rounds != self._rounds_seen:
            self._rounds_seen = ledger.rounds
            text = f"{ledger.compared_bytes / _UNITS[self.unit]:.1f} {self.unit}"
            if self.show_ratio:
                text += f" · {ledger.ratio_vs_ddp:.1f}x < DDP"
            self._text = text
        return self._text

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        bar = trainer.progress_bar_callback
        ledger = self.ledger_of(trainer)
        if bar is None or ledger is None or getattr(bar.get_metrics, "_desloc_comm", False):
            return
        bar.get_metrics = self._extend(bar.get_metrics, trainer)  # type: ignore[method-assign]

    def _extend(self, get_metrics: Callable[..., dict[str, Any]], trainer: "pl.Trainer") -> Callable[..., dict[str, Any]]:
        def get_metrics_with_comm(*args: Any, **kwargs: Any) -> dict[str, Any]:
            items = get_metrics(*args, **kwargs)
            ledger = self.ledger_of(trainer)
            text = self.progress_text(ledger) if ledger is not None else None
            return items if text is None else {**items, self.key: text}

        get_metrics_with_comm._desloc_comm = True  # type: ignore[attr-defined]
        return get_metrics_with_comm
