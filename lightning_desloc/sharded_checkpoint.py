"""Checkpoints of sharded groups (``shard_within_group=True``): a consensus in torch's distributed
checkpoint format (DCP) plus each rank's own shards.

A checkpoint is a directory, laid out as Lightning's ``ModelParallelStrategy`` lays out its distributed
checkpoints, so that it loads without this package::

    <path>/.metadata, <path>/__*_*.distcp   DCP: {"state_dict": the consensus model,
                                                  "optimizer_0": the consensus optimizer state, ...}
    <path>/meta.pt                          everything else of Lightning's checkpoint (loops, callbacks,
                                            schedulers, ...) and, under "desloc", the core's shared state,
                                            the layout and the manifest of the rank files
    <path>/desloc/rank<r>.pt                rank r's own local shards of the parameters and optimizer
                                            states, the core's per-rank state and its RNG states

The **consensus** is what every rank of the whole run holds on average: each rank's local shards
averaged with the ranks at its position in the other groups (category ``checkpoint``), only for what
differs (nothing for the parameters right after a parameter round, nothing for a state right after its
round), and the plain floating tensors (buffers) over every rank. Every group then holds the same
consensus shards and DCP writes each chunk once. DCP reshards on load, so the consensus loads into any
layout: Lightning's ``ModelParallelStrategy`` or FSDP2 with another number of ranks, or into a plain
module in one process (``torch.distributed.checkpoint.load`` without a process group).

**Resume** (every rank, with the module sharded and the optimizers built):

* the consensus is loaded through DCP into the live module and optimizers (the optimizers' states are
  created first, as ``torch.distributed.checkpoint.state_dict`` does, with a step of zero learning rate);
* if the world size and the group size are the saved ones and every rank's own file is there and
  intact (SHA-256 and size from the manifest; every rank's verdict is shared, so all ranks decide alike),
  the **local path**: each rank copies its own shards over the consensus, restores the core's per-rank
  state and its RNG, and the run continues bit for bit as if it had not stopped;
* otherwise the **consensus path**: every rank starts from the consensus (new groups, a new number of
  groups or of ranks per group: every group gets the averaged momenta), with the step counters and the
  schedule of the checkpoint.

A save is atomic: everything is written into ``.<name>.tmp-<id>`` beside ``path`` and rank 0 moves it into
place only once every rank has reported its files written; a failure on any rank (a full disk) raises
:class:`~lightning_desloc.checkpoint.CheckpointWriteError` on every rank and leaves the previous
checkpoint at ``path`` as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.nn import Module
from torch.optim import Optimizer

from lightning_desloc.checkpoint import (
    CheckpointShardError,
    ResumeDecision,
    _capture_rng,
    _raise_write_failures,
    _restore_rng,
    _write_failure,
    atomic_save,
    file_digest,
)
from lightning_desloc.options import is_averaged
from lightning_desloc.sharding import is_dtensor, local_tensor

if TYPE_CHECKING:
    from lightning_desloc.sync import DeslocSync

__all__ = ["FORMAT", "META_FILE", "is_sharded_checkpoint", "load", "remove", "save"]

#: the non-tensor part of the checkpoint, as Lightning's ModelParallelStrategy names it
META_FILE = "meta.pt"
#: where each rank's own shards go, inside the checkpoint directory
LOCAL_DIR = "desloc"
FORMAT = "desloc-sharded-1"


def is_sharded_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a directory holding a DCP checkpoint with its ``meta.pt``."""
    path = str(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata")) \
        and os.path.isfile(os.path.join(path, META_FILE))


def rank_file(rank: int) -> str:
    return os.path.join(LOCAL_DIR, f"rank{rank}.pt")


def _state_dicts(module: Module, optimizers: Sequence[Optimizer]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The live module's and optimizers' state dicts as DCP sees them: fully qualified names, DTensor
    values for what FSDP2 shards (views of the live tensors, nothing is copied)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(module), [get_optimizer_state_dict(module, opt) for opt in optimizers]


def _averaged_entries(container: dict[str, Any], tensor_state: bool) -> list[str]:
    """Keys of ``container`` whose values are averaged: floating tensors (of an optimizer's per-parameter
    state: not its counters)."""
    keys = []
    for key, value in container.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        if tensor_state and not is_averaged(key, value, None):
            continue
        keys.append(key)
    return keys


def _own_values(msd: dict[str, Any], osds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """This rank's own values: the local shard of every floating tensor, copied to host memory."""
    def own(t: Tensor) -> Tensor:
        return local_tensor(t).detach().to("cpu", copy=True)

    return {"params": {k: own(msd[k]) for k in _averaged_entries(msd, False)},
            "optimizers": [{fqn: {k: own(st[k]) for k in _averaged_entries(st, True)}
                            for fqn, st in osd.get("state", {}).items()} for osd in osds]}


def _consensus_(core: "DeslocSync", msd: dict[str, Any], osds: Sequence[dict[str, Any]]) -> None:
    """Replace, in ``msd`` and ``osds`` (copies of the containers: not in the live ones), every value that may differ between
    groups by the consensus: DTensors (local shards averaged across groups, rebuilt as DTensors of the same
    mesh and placements) and plain floating tensors (averaged over every rank)."""
    from torch.distributed.tensor import DTensor

    outer = core.levels[-1].comm
    assert outer is not None
    places: list[tuple[dict[str, Any], str]] = []
    if not core.params_in_sync:
        places += [(msd, k) for k in _averaged_entries(msd, False)]
    else:  # the parameters are equal everywhere; buffers are not averaged inside a group
        places += [(msd, k) for k in _averaged_entries(msd, False) if not is_dtensor(msd[k])]
    for index, osd in enumerate(osds):
        in_sync = core.states_in_sync(index)
        for st in osd.get("state", {}).values():
            places += [(st, k) for k in _averaged_entries(st, True) if k not in in_sync]
    sharded = [(c, k, local_tensor(c[k]).detach().clone()) for c, k in places if is_dtensor(c[k])]
    plain = [(c, k, c[k].detach().clone()) for c, k in places if not is_dtensor(c[k])]
    if sharded:
        outer.average_({"checkpoint": [mean for _, _, mean in sharded]}, bucket_cap_bytes=core.bucket_cap_bytes)
    if plain:
        core.comm.average_({"checkpoint": [mean for _, _, mean in plain]}, bucket_cap_bytes=core.bucket_cap_bytes)
    for container, key, mean in sharded:
        live = container[key]
        container[key] = DTensor.from_local(mean, device_mesh=live.device_mesh, placements=live.placements,
                                            run_check=False, shape=live.shape, stride=live.stride())
    for container, key, mean in plain:
        container[key] = mean


def save(core: "DeslocSync", module: Module, optimizers: Sequence[Optimizer], checkpoint: dict[str, Any],
         filepath: Any) -> None:
    """Write the checkpoint directory at ``filepath`` (see the module docstring). Call on every rank.
    ``checkpoint`` is Lightning's dict; its ``state_dict`` and ``optimizer_states`` are taken from the live
    module and optimizers instead (as DCP state dicts)."""
    from torch.distributed.checkpoint import save as dcp_save

    core.settle_control()  # on_nonfinite: raise, or heal every rank fully, before anything is saved
    core.check_finite_now("a checkpoint save")
    comm = core.comm
    rank, world = comm.rank, comm.world_size
    path = os.path.abspath(str(comm.broadcast_object(str(filepath), src=0)))
    save_id = comm.broadcast_object(uuid.uuid4().hex[:12], src=0)
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{save_id}")
    msd, osds = _state_dicts(module, optimizers)
    failure: Optional[dict[str, Any]] = None
    own_error: Optional[BaseException] = None
    digest: Optional[tuple[str, int]] = None
    own = os.path.join(staging, rank_file(rank))
    values = _own_values(msd, osds)  # this rank's own shards, before the consensus replaces them in msd/osds
    # new containers: an optimizer state dict's per-parameter dicts are the optimizer's own
    msd = dict(msd)
    osds = [{**osd, "state": {fqn: dict(st) for fqn, st in osd.get("state", {}).items()}} for osd in osds]
    _consensus_(core, msd, osds)
    try:  # after the consensus, so that the ledgers saved include this save's bytes, as the run has them
        os.makedirs(os.path.dirname(own), exist_ok=True)
        digest = atomic_save(own, {"format": FORMAT, "save_id": save_id, "rank": rank, "world_size": world,
                                   **values, "core": core.state_dict()["local"], "rng": _capture_rng()})
    except OSError as err:
        failure, own_error = _write_failure(rank, own, err), err
    del values
    try:  # collective: DCP shares a failure of any rank with every rank (as a CheckpointException)
        dcp_save({"state_dict": msd, **{f"optimizer_{i}": osd for i, osd in enumerate(osds)}}, checkpoint_id=staging)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported to every rank below
        mine = _own_dcp_error(err, rank)
        if failure is None and mine is not None:
            failure, own_error = _write_failure(rank, getattr(mine, "filename", None) or f"DCP's files in {staging}", mine), mine
    reports = comm.all_gather_object((digest, failure))
    failures = [f for _, f in reports if f is not None]
    if not failures and rank == 0:
        meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        meta["desloc"] = {
            "format": FORMAT, "save_id": save_id, "world_size": world,
            "group_size": core.config.hierarchy.group_size if core.config.hierarchy is not None else 1,
            "shards": [{"rank": r, "file": rank_file(r), "sha256": d[0], "bytes": d[1]} for r, (d, _) in enumerate(reports)],
            "core": core.state_dict()["shared"],
        }
        try:
            atomic_save(os.path.join(staging, META_FILE), meta)
            _move_into_place(staging, path)
        except OSError as err:
            failures.append(_write_failure(0, os.path.join(staging, META_FILE), err))
            own_error = err
    committed = comm.broadcast_object(failures, src=0)  # no rank goes on before the directory is in place
    if committed:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        _raise_write_failures(path, committed, own_error)


def _own_dcp_error(err: BaseException, rank: int) -> Optional[BaseException]:
    """This rank's own error in what DCP raised: DCP raises the same ``CheckpointException`` (a
    ``BaseException``, holding every failed rank's exception) on every rank; ``None`` when this rank's part
    succeeded (the failed ranks report theirs)."""
    if not isinstance(err, CheckpointException):
        return err
    wrapped = err.failures.get(rank)
    return None if wrapped is None else wrapped[0]


def _move_into_place(staging: str, path: str) -> None:
    """Rank 0: the finished directory replaces the checkpoint at ``path`` (a file or a directory)."""
    old = None
    if os.path.lexists(path):
        old = f"{staging}.old"
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            with suppress(OSError):
                os.remove(old)


def remove(filepath: Any) -> None:
    """Remove a checkpoint directory (or file) written by :func:`save`; rank 0 only."""
    path = str(filepath)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with suppress(OSError):
            os.remove(path)


def _own_file_verdict(meta: dict[str, Any], path: str, world: int, group_size: int, rank: int) -> str:
    """``""`` when this rank can take the local path, else why not (the same words on every rank for a
    layout change)."""
    if meta.get("world_size") != world or meta.get("group_size") != group_size:
        return (f"saved with {meta.get('world_size')} ranks in groups of {meta.get('group_size')}, resumed with "
                f"{world} in groups of {group_size}")
    entry = next((e for e in meta.get("shards", []) if e.get("rank") == rank), None)
    if entry is None:
        return f"rank {rank}: no entry in the manifest"
    file = os.path.join(path, entry["file"])
    if not os.path.isfile(file):
        return f"rank {rank}: {file} is missing"
    if file_digest(file) != (entry["sha256"], entry["bytes"]):
        return f"rank {rank}: {file} is truncated or corrupt (its SHA-256 or size differs from the manifest)"
    return ""


def load(core: "DeslocSync", module: Module, optimizers: Sequence[Optimizer], filepath: Any, *, strict: bool = True,
         info: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> tuple[dict[str, Any], ResumeDecision]:
    """Resume from the checkpoint directory ``filepath`` on every rank (see the module docstring): the
    consensus into ``module`` and ``optimizers``, then this rank's own shards on the local path. Returns the
    rest of the checkpoint (for Lightning's loops, callbacks and schedulers) and the decision."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    comm = core.comm
    rank, world = comm.rank, comm.world_size
    path = os.path.abspath(str(comm.broadcast_object(str(filepath), src=0)))
    if not is_sharded_checkpoint(path):
        raise CheckpointShardError(
            f"{path} is not a checkpoint of sharded groups (a directory with DCP's .metadata and {META_FILE}); "
            "DeslocStrategy(shard_within_group=True) resumes only from its own checkpoints. Pass the directory "
            "a sharded run saved.")
    checkpoint = torch.load(os.path.join(path, META_FILE), map_location="cpu", weights_only=False)
    meta = checkpoint.pop("desloc", None) or {}
    msd, osds = _state_dicts(module, optimizers)  # creates the optimizers' states if they have none yet
    state = {"state_dict": msd, **{f"optimizer_{i}": osd for i, osd in enumerate(osds)}}
    try:
        dcp_load(state, checkpoint_id=path)
    except CheckpointException as err:  # a BaseException: Lightning would not report it as an error of the fit
        errors = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(err.failures.items()))
        raise CheckpointShardError(
            f"DCP could not read the consensus from {path} ({errors}). The directory is incomplete or was written "
            "by another program; resume from another checkpoint.") from None
    set_model_state_dict(module, msd, options=_options(strict))
    for opt, osd in zip(optimizers, osds):
        set_optimizer_state_dict(module, opt, osd, options=_options(strict))
    group_size = core.config.hierarchy.group_size if core.config.hierarchy is not None else 1
    reasons = comm.all_gather_object(_own_file_verdict(meta, path, world, group_size, rank))
    local = all(not r for r in reasons)
    decision = ResumeDecision("local" if local else "consensus", path,
                              [r or "every rank's own file is there and intact" for r in reasons],
                              meta.get("world_size"), world)
    device = next((p.device for p in module.parameters()), None)
    shared = meta.get("core")
    if local:
        own = torch.load(os.path.join(path, rank_file(rank)), map_location="cpu", weights_only=True)
        _copy_own_(module, optimizers, own)
        if shared is not None:
            core.load_state_dict({"shared": shared, "local": own.get("core")}, device)
        _restore_rng(own["rng"])
        core.params_in_sync = False
        info(f"DES-LOC resume from {path}: LOCAL path, each of the {world} ranks restored its own shards of the "
             f"parameters and optimizer states and its RNG at optimizer step {core.optimizer_steps}.")
    else:
        if shared is not None:
            core.load_state_dict({"shared": shared, "local": None}, device)
        core.params_in_sync = True
        why = "; ".join(sorted(set(r for r in reasons if r)))
        info(f"DES-LOC resume from {path}: CONSENSUS path ({why}); all {world} ranks start from the averaged "
             f"parameters and optimizer states at optimizer step {core.optimizer_steps}.")
        if not meta:
            warn(f"DES-LOC resume from {path}: no DES-LOC state in {META_FILE} (a checkpoint of another strategy?); "
                 "the step counters start from 0.")
    return checkpoint, decision


def _options(strict: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=strict)


def _copy_own_(module: Module, optimizers: Sequence[Optimizer], own: dict[str, Any]) -> None:
    """Copy this rank's own shards (saved by :func:`save`) over the consensus just loaded."""
    msd, osds = _state_dicts(module, optimizers)
    with torch.no_grad():
        for key, value in own["params"].items():
            local_tensor(msd[key]).copy_(value)
        for osd, saved in zip(osds, own["optimizers"]):
            for fqn, states in saved.items():
                for key, value in states.items():
                    local_tensor(osd["state"][fqn][key]).copy_(value)
