"""DES-LOC for PyTorch Lightning: ``Trainer(strategy="desloc")``.

Importing this package registers the strategy strings ``"desloc"``, ``"desloc_spawn"``,
``"desloc_fork"`` and ``"desloc_notebook"`` with Lightning's Trainer and with Lightning Fabric
(``Fabric(strategy="desloc")``, :class:`DeslocFabricStrategy`).
"""

from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from lightning_desloc.averaging import average_, broadcast_
from lightning_desloc.comm import Comm
from lightning_desloc.config import AutoConfig, DeslocConfig, DriftConfig, HierarchyConfig, OuterConfig
from lightning_desloc.fabric import DeslocFabricStrategy
from lightning_desloc.ledger import CommLedger
from lightning_desloc.schedule import SyncPlan, SyncSchedule, default_state_periods
from lightning_desloc.strategy import DeslocStrategy, averaged_state_keys
from lightning_desloc.sync import DeslocSync

DeslocStrategy.register_strategies(StrategyRegistry)
DeslocFabricStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)

__all__ = [
    "AutoConfig",
    "Comm",
    "CommLedger",
    "DeslocConfig",
    "DriftConfig",
    "HierarchyConfig",
    "OuterConfig",
    "DeslocFabricStrategy",
    "DeslocStrategy",
    "DeslocSync",
    "SyncPlan",
    "SyncSchedule",
    "average_",
    "averaged_state_keys",
    "broadcast_",
    "default_state_periods",
]
__version__ = "0.1.0"
