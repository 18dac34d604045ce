"""FSDP2 inside each group, DES-LOC across groups, on local shards (``shard_within_group=True``).

With ``group_size = g`` and ``M`` ranks, the ranks form a 2-D device mesh of shape ``(G, g)``,
``G = M / g``, dims ``("replicate", "shard")``: row ``a`` is group ``a`` (ranks ``a g .. a g + g - 1``),
column ``i`` the ranks at position ``i`` of every group (``i, i + g, i + 2g, ...``). Inside a group the
module is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard`` over ``mesh["shard"]``): each rank
holds ``1/g`` of every parameter (rows of dim 0), of its gradient and of its optimizer states, FSDP
all-gathers the parameters for forward and backward and reduce-scatters the gradients (the group mean)
every step. So the ranks of a group are one data-parallel replica, as with ``group_param_sync_every=1``
(DDP inside the group), only sharded: the core's inner :class:`~lightning_desloc.sync.Level` is kept in
sync by FSDP (``every_step="fsdp"``) and the core sends nothing there.

Across groups DES-LOC runs unchanged, on shards. Write ``x[a, i]`` for the shard at position ``i`` on
the rank of group ``a`` (of the parameters or of one optimizer state; ``x[a, i]`` is the slice ``i``
of group ``a``'s full tensor ``X[a]``). The outer round after step ``s`` (params when ``s % K_x == 0``,
state ``k`` when ``s % K_k == 0``) replaces ``x[a, i]`` by ``(1/G) sum_b x[b, i]`` over the replicate
group of position ``i``; since every position averages its own slice, the full tensor becomes
``(1/G) sum_b X[b]``, exactly what the unsharded hierarchical run computes. Each rank sends its local
shard only: ``1/g`` of the model per parameter round (the ledger counts the local shard bytes;
``ddp_equivalent_bytes`` still counts the full model's gradient bytes per step).

Setup: a sharded model cannot be broadcast whole. Each rank of group 0 broadcasts its local shards to
its replicate group (every rank at position ``i`` receives the shards of rank ``i``), so every group
starts from group 0's weights. Group 0's ranks must therefore initialise consistently (the same seed
on every rank, e.g. ``seed_everything``, or weights loaded before sharding), as plain FSDP2 requires:
FSDP2 keeps each rank's own slice of the tensor it was given. Floating buffers (not sharded by FSDP2)
are broadcast from rank 0 over the world.

What :class:`~lightning_desloc.DeslocStrategy` does with ``shard_within_group=True``:

1. ``setup_environment``: the mesh (:func:`make_mesh`), exposed as ``strategy.device_mesh`` and
   ``LightningModule.device_mesh``, so ``configure_model`` can shard as with Lightning's
   ``ModelParallelStrategy``: ``fully_shard(layer, mesh=self.device_mesh["shard"])``;
2. ``setup``: if no parameter is a DTensor after ``configure_model``, ``fully_shard(child,
   mesh=mesh["shard"])`` for every direct child module of the LightningModule that holds parameters
   (:func:`shard_module`; the LightningModule itself is not wrapped, because the training loop calls
   ``training_step``, not its ``forward``); then :func:`check_sharded`, the groups from the mesh, and
   :func:`broadcast_group_zero`.

Checkpoints: :mod:`lightning_desloc.sharded_checkpoint` (a DCP consensus plus each rank's own shards).
Not yet (clear errors): compression, ``overlap_steps``, ``fragments``,
``outer_lr``, ``max_drift``, ``"auto"``, ``ddp_warmup_steps``, ``state_policy="reset"``,
``group_param_sync_every > 1``; see ``docs/sharded.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import Module

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from lightning_desloc.sync import DeslocSync

#: the mesh's dims: across groups (DES-LOC), within a group (FSDP2)
REPLICATE, SHARD = "replicate", "shard"



def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: Tensor) -> Tensor:
    """What a rank holds of ``t``: its local shard for a DTensor (a view: writing it writes the
    parameter or state), ``t`` itself otherwise."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local().detach()


def local_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """:func:`local_tensor` of each (the tensors a round hands to the collectives)."""
    return [local_tensor(t) for t in tensors]


def check_world(world_size: int, group_size: int) -> None:
    """Raise naming the fix when ``group_size`` does not divide the world."""
    if group_size < 1 or world_size % group_size:
        raise ValueError(
            f"shard_within_group=True needs group_size={group_size} to divide the number of processes "
            f"({world_size}): the device mesh has shape (world_size // group_size, group_size). Use a divisor "
            f"of {world_size} (e.g. the devices per node)."
        )


def make_mesh(world_size: int, group_size: int, device: torch.device) -> "DeviceMesh":
    """The 2-D mesh ``(world_size // group_size, group_size)``, dims ``("replicate", "shard")``
    (collective: every rank calls it once)."""
    from torch.distributed.device_mesh import init_device_mesh

    check_world(world_size, group_size)
    return init_device_mesh(device.type, (world_size // group_size, group_size), mesh_dim_names=(REPLICATE, SHARD))


def has_meta_tensors(module: Module) -> bool:
    """Whether a parameter or buffer of ``module`` is on the meta device (built with ``torch.device("meta")``:
    shapes only, materialised after sharding)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def has_dtensor_params(module: Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def shard_module(module: Module, mesh: "DeviceMesh") -> bool:
    """Shard ``module`` with FSDP2 over ``mesh["shard"]`` unless ``configure_model`` already did: every
    direct child holding parameters becomes one ``fully_shard`` unit. Returns whether it sharded."""
    if has_dtensor_params(module):
        return False
    from torch.distributed.fsdp import fully_shard

    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"shard_within_group=True: the LightningModule holds parameters {own} directly, which the strategy "
            "cannot shard for you (it shards each child module). Put them in a submodule, or shard in "
            "configure_model with fully_shard(..., mesh=self.device_mesh['shard'])."
        )
    for child in module.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh[SHARD])
    return True


def check_sharded(module: Module, mesh: "DeviceMesh") -> None:
    """Raise naming the fix unless every parameter is a DTensor sharded over the group (``mesh["shard"]``)
    only: a parameter replicated over groups by FSDP (HSDP, the 2-D mesh) would be all-reduced across
    groups every step, which is DDP, not DES-LOC."""
    plain = [name for name, p in module.named_parameters() if not is_dtensor(p)]
    wrong = [name for name, p in module.named_parameters()
             if is_dtensor(p) and tuple(p.device_mesh.mesh_dim_names or ()) != (SHARD,)]
    if plain or wrong:
        raise ValueError(
            "shard_within_group=True: every parameter must be sharded over the group's mesh, "
            "fully_shard(module, mesh=self.device_mesh['shard']) in configure_model (or leave configure_model "
            "without sharding and the strategy shards each child module). "
            + (f"Not sharded: {plain}. " if plain else "")
            + (f"Sharded over another mesh (the whole 2-D mesh makes HSDP, which all-reduces across groups every "
               f"step): {wrong}." if wrong else "")
        )


def broadcast_group_zero(core: "DeslocSync", module: Module, group_size: int) -> None:
    """Every group starts from group 0's weights: the local shards of each parameter from the rank of
    group 0 at this rank's position (global rank ``rank % group_size``) over the replicate group, the
    floating and other buffers from rank 0 over the world (category ``setup``)."""
    outer = core.levels[-1].comm
    assert outer is not None, "setup_groups first"
    shards = local_tensors(module.parameters())
    outer.broadcast_(shards, src=core.comm.rank % group_size, category="setup", bucket_cap_bytes=core.bucket_cap_bytes)
    core.comm.broadcast_(list(module.buffers()), src=0, category="setup", bucket_cap_bytes=core.bucket_cap_bytes)


def full_state_dict(module: Module) -> dict[str, Any]:
    """``module.state_dict()`` with every DTensor gathered whole (``full_tensor()``: an all-gather inside
    the group; every rank calls it, in the same order). For the spawn launcher, which hands rank 0's
    weights to the main process's unsharded module after ``fit``."""
    return {name: value.full_tensor() if is_dtensor(value) else value for name, value in module.state_dict().items()}


def local_storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the storages behind the local parts of ``tensors``, each storage once (what the rank holds)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = local_tensor(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
