"""DES-LOC for PyTorch Lightning: ``Trainer(strategy="desloc")``.

Importing this package registers the strategy strings ``"desloc"``, ``"desloc_spawn"``,
``"desloc_fork"`` and ``"desloc_notebook"`` with Lightning.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_desloc.averaging import average_, broadcast_
from lightning_desloc.ledger import CommLedger
from lightning_desloc.schedule import SyncPlan, SyncSchedule, default_state_periods
from lightning_desloc.strategy import DeslocStrategy, averaged_state_keys

DeslocStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "CommLedger",
    "DeslocStrategy",
    "SyncPlan",
    "SyncSchedule",
    "average_",
    "averaged_state_keys",
    "broadcast_",
    "default_state_periods",
]
__version__ = "0.1.0"
