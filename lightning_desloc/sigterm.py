"""A SIGTERM under DES-LOC: every rank stops at the same step, with no collective on local steps.

Lightning's training loop decides whether to stop by broadcasting a SIGTERM flag from rank 0 before
every batch (``_TrainingEpochLoop._broadcast_sigterm_tensor``), and its signal handler broadcasts too.
That is a collective, so a round trip on the link, on every local step: the cost DES-LOC exists to
avoid. Here the flag rides on DES-LOC's own averaging rounds instead
(:meth:`~lightning_desloc.sync.DeslocSync.raise_signal`):

1. the handler only notes the signal on this rank (and, as Lightning's does, passes it on to the
   processes the launcher started);
2. the next outermost averaging round carries every rank's flag (a float beside the parameters);
3. one optimizer step later every rank reads the same agreement, and before the next batch every
   rank raises Lightning's ``SIGTERMException``, as Lightning does after its broadcast.

So a SIGTERM on any rank stops every rank within one parameter period (``K_x`` steps) plus one step,
at the same step, and the last checkpoint stays the one to resume from. Both hooks are private
Lightning methods, replaced on this trainer's objects only; with a Lightning that lacks them nothing
is replaced and Lightning's own behaviour stays.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from lightning_desloc.sync import DeslocSync

_log = logging.getLogger(__name__)


def stop_on_rounds(trainer: Any, core: DeslocSync) -> bool:
    """Carry SIGTERM on ``core``'s rounds for ``trainer`` (call in the strategy's ``setup``, before the
    trainer registers its signal handlers). Returns whether Lightning's hooks were found and replaced."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    connector = getattr(trainer, "_signal_connector", None)
    if not (hasattr(loop, "_broadcast_sigterm_tensor") and hasattr(connector, "_sigterm_notifier_fn")):
        return False

    def note_sigterm(signum: Any, frame: Any) -> None:
        _log.info(rank_prefixed_message(
            f"Received SIGTERM: {signum}; every rank stops after DES-LOC's next averaging round", trainer.local_rank))
        if not core.raised("stop"):
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        core.raise_signal("stop")

    def stop_if_agreed() -> None:
        if "stop" in core.agreed:
            connector.received_sigterm = True  # what the loops and callbacks read from here on
            raise SIGTERMException()

    connector._sigterm_notifier_fn = note_sigterm  # read by register_signal_handlers, after setup
    loop._broadcast_sigterm_tensor = stop_if_agreed
    return True
