"""Fault-tolerant DES-LOC checkpoints: a consensus main file plus one shard per rank.

Between averages every rank holds its own parameters and optimizer states, so one rank's copy is not
"the" model. A save therefore writes two things:

* the **main file** at the path the user asked for: an ordinary Lightning checkpoint whose
  ``state_dict`` and ``optimizer_states`` hold the *consensus*, the mean over ranks at that moment of
  the parameters, the floating buffers and every averaged optimizer state (counters such as ``step``
  and integer buffers are rank 0's: they are equal on every rank). Plain Lightning and
  ``LightningModule.load_from_checkpoint`` read it without this package. A ``"desloc"`` entry of plain
  values (ints, strings, lists, dicts) records the schedule position and which shards belong to it;
* **shards** in a sibling directory ``<main file>.shards/<save id>/``: ``rank-00000.pt``, ... with
  each rank's own parameters, optimizer state, RNG state, step counters and ledger, and a
  ``manifest.json`` (world size, step, SHA-256 and size of every shard, model fingerprint).

The consensus is computed on copies (the ranks' live state is never touched) in one coalesced
all-reduce round recorded in the strategy's ledger as category ``"checkpoint"``.

Writes are atomic: every file is written to a temporary name in its final directory, flushed,
``fsync``-ed and moved into place with ``os.replace``. Shards of a new save go to a fresh ``<save id>``
directory; the main file, written last by rank 0, is the commit point, and only after it is in place
are older save directories beside it deleted. A crash anywhere in a save leaves the previous main
file and the shards it names intact.

On resume (``trainer.fit(ckpt_path=...)``) every rank reads the main file and checks its own shard;
the ranks then agree, in one small all-gather, on one of two paths:

* **local**: same world size and every shard present and valid: each rank restores its own state and
  RNG; the run continues exactly as if it had not stopped;
* **consensus**: a different world size, a plain (non DES-LOC) checkpoint or missing shards: every
  rank starts from the consensus, so a new rank gets averaged momenta, not zeros.

A truncated, corrupt (checksum mismatch) or foreign shard raises :class:`CheckpointShardError` on every
rank, unless the strategy was built with ``allow_consensus_fallback=True``, which takes the consensus
path with a warning instead. See ``docs/checkpointing.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_desloc.averaging import average_
from lightning_desloc.schedule import NEVER_AVERAGED_KEYS, SyncSchedule

if TYPE_CHECKING:
    from lightning_desloc.strategy import DeslocStrategy

FORMAT_VERSION = 1
#: key of the DES-LOC metadata in the main checkpoint file
META_KEY = "desloc"
SHARDS_SUFFIX = ".shards"
MANIFEST_NAME = "manifest.json"
LEDGER_CATEGORY = "checkpoint"

# shard status codes, from good to bad; the ranks take the worst one
OK, RESIZED, MISSING, BAD = 0, 1, 2, 3


class CheckpointShardError(RuntimeError):
    """A shard of a DES-LOC checkpoint is truncated, corrupt or belongs to another checkpoint or model."""


@dataclass
class ResumeDecision:
    """What a resume did: ``path`` is ``"local"`` or ``"consensus"``; ``reasons`` has one line per rank."""

    path: str
    checkpoint: str
    reasons: list[str] = field(default_factory=list)
    saved_world_size: Optional[int] = None
    world_size: int = 1
    #: ``checkpoint`` with symlinks resolved (``last.ckpt`` -> the file it pointed to at resume time)
    resolved: str = ""

    def __post_init__(self) -> None:
        self.resolved = self.resolved or os.path.realpath(self.checkpoint)


# ----------------------------------------------------------------------------------------- helpers
def _fault_point(name: str, path: str) -> None:
    """No-op hook called at the risky moments of a save; tests replace it to inject crashes."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_gather_object(obj: Any, strategy: "DeslocStrategy") -> list[Any]:
    world, _ = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    strategy.ledger.record({"control": len(pickle.dumps(obj)) * world})
    return out


def shard_root(filepath: _PATH, resolve_links: bool = False) -> str:
    """The shard directory of main file ``filepath``. Loading resolves symlinks (``save_last="link"``)
    so that ``last.ckpt`` finds the shards of the file it points to; saving never does."""
    path = os.path.realpath(filepath) if resolve_links else os.path.abspath(filepath)
    return path + SHARDS_SUFFIX


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _fsync_dir(directory: str) -> None:
    with suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either its old content or all of ``data``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            view = memoryview(data)
            half = len(view) // 2
            f.write(view[:half])
            _fault_point("write", path)
            f.write(view[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(module: torch.nn.Module) -> str:
    """Hash of the state-dict keys, shapes and dtypes: equal for the same architecture, else different."""
    items = [
        (name, list(t.shape), str(t.dtype)) for name, t in module.state_dict().items() if isinstance(t, Tensor)
    ]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _capture_rng() -> dict[str, Any]:
    """RNG states as tensors and plain values, so that a shard loads with ``weights_only=True``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    with suppress(ImportError):
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        with suppress(ImportError):
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        with suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _merge_ledger(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The saved ledger plus what this process has sent since it started (setup broadcast, control)."""
    out = {
        "bytes": dict(saved["bytes"]),
        "rounds_by_category": dict(saved["rounds_by_category"]),
        "rounds": saved["rounds"] + current["rounds"],
        "ddp_equivalent_bytes": saved["ddp_equivalent_bytes"] + current["ddp_equivalent_bytes"],
    }
    for key in ("bytes", "rounds_by_category"):
        for cat, value in current[key].items():
            out[key][cat] = out[key].get(cat, 0) + value
    return out


# ----------------------------------------------------------------------------------------- saving
def _local_state_dict(strategy: "DeslocStrategy", state_dict: dict[str, Any]) -> dict[str, Any]:
    """During consensus validation the live parameters are the consensus and the rank's own values are
    stashed; a shard must hold the rank's own values."""
    stash = getattr(strategy, "_stashed_local", None)
    if stash is None or strategy.model is None:
        return state_dict
    model = strategy.model
    names = [n for n, _ in model.named_parameters()] + [n for n, b in model.named_buffers() if b.is_floating_point()]
    out = dict(state_dict)
    for name, local in zip(names, stash):
        if name in out:
            out[name] = local
    return out


def _is_averaged_state(key: str, value: Any, param: Optional[Tensor]) -> bool:
    if key in NEVER_AVERAGED_KEYS or not isinstance(value, Tensor) or not value.is_floating_point():
        return False
    return value.dim() > 0 or (param is not None and param.dim() == 0)


def consensus_copies(
    strategy: "DeslocStrategy", state_dict: dict[str, Any], optimizer_states: Optional[list[dict[str, Any]]]
) -> tuple[dict[str, Any], Optional[list[dict[str, Any]]]]:
    """Copies of ``state_dict`` and ``optimizer_states`` with every floating tensor replaced by its mean
    over ranks, in one coalesced round (ledger category ``"checkpoint"``). The inputs are not modified."""
    tensors: list[Tensor] = []

    def copy(t: Tensor) -> Tensor:
        c = t.detach().clone()
        tensors.append(c)
        return c

    sd = {k: copy(v) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in state_dict.items()}
    opt_states = None
    if optimizer_states is not None:
        opt_states = []
        for i, osd in enumerate(optimizer_states):
            params: list[Tensor] = []
            if i < len(strategy.optimizers):
                params = [p for g in strategy.optimizers[i].param_groups for p in g["params"]]
            state = {}
            for idx, per_param in osd.get("state", {}).items():
                p = params[idx] if isinstance(idx, int) and idx < len(params) else None
                state[idx] = {
                    key: copy(v) if _is_averaged_state(key, v, p) else v for key, v in per_param.items()
                }
            opt_states.append({**osd, "state": state})
    average_({LEDGER_CATEGORY: tensors}, strategy.ledger, bucket_cap_bytes=strategy.bucket_cap_bytes)
    return sd, opt_states


def save(
    strategy: "DeslocStrategy", checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
) -> None:
    """Write the consensus main file at ``filepath`` and this rank's shard beside it. Call on every rank."""
    if storage_options is not None:
        raise TypeError(
            "DeslocStrategy writes checkpoints itself and takes no storage_options; got "
            f"{storage_options!r}. Save without storage_options."
        )
    filepath = str(filepath)
    world, rank = _world()
    module = strategy.lightning_module
    fingerprint = model_fingerprint(module) if module is not None else ""
    local_sd = _local_state_dict(strategy, checkpoint["state_dict"])
    local_opt = checkpoint.get("optimizer_states")
    step = int(checkpoint.get("global_step", 0))
    save_id = strategy.broadcast(f"step{step}-{uuid.uuid4().hex[:12]}", src=0)

    consensus_sd, consensus_opt = consensus_copies(strategy, local_sd, local_opt)

    # 1. every rank writes its own shard into the new save directory
    root = shard_root(filepath)
    save_dir = os.path.join(root, save_id)
    os.makedirs(save_dir, exist_ok=True)
    shard = {
        "format": FORMAT_VERSION,
        "save_id": save_id,
        "rank": rank,
        "world_size": world,
        "fingerprint": fingerprint,
        "global_step": step,
        "optimizer_steps": list(strategy.optimizer_steps),
        "state_dict": local_sd,
        "optimizer_states": local_opt,
        "ledger": strategy.ledger.state_dict(),
        "rng": _capture_rng(),
        "compression": strategy.compression.state_dict() if strategy.compression is not None else None,
    }
    data = _to_bytes(shard)
    atomic_write(os.path.join(save_dir, shard_name(rank)), data)
    _fault_point("shard_written", filepath)
    entries = _all_gather_object({"rank": rank, "file": shard_name(rank), "sha256": _sha256(data), "bytes": len(data)}, strategy)
    if rank != 0:
        return

    # 2. rank 0: the manifest, then the main file (the commit point), then old saves are removed
    meta = {
        "format": FORMAT_VERSION,
        "save_id": save_id,
        "world_size": world,
        "global_step": step,
        "optimizer_steps": list(strategy.optimizer_steps),
        "fingerprint": fingerprint,
        "schedule": {
            "param_sync_every": strategy.schedule.param_sync_every,
            "state_sync_every": dict(strategy.schedule.state_sync_every),
            "state_policy": strategy.schedule.state_policy,
        },
        "ledger": strategy.ledger.state_dict(),
        "weights_only": local_opt is None,
        # equal on every rank, so rank 0's copy is the global one
        "outer": strategy.outer.state_dict() if strategy.outer is not None else None,
        "auto_chosen": list(strategy.auto.chosen) if strategy.auto is not None and strategy.auto.chosen else None,
    }
    manifest = {**{k: meta[k] for k in ("format", "save_id", "world_size", "global_step", "optimizer_steps", "fingerprint")}}
    manifest["shards"] = sorted(entries, key=lambda e: e["rank"])
    atomic_write(os.path.join(save_dir, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    main = dict(checkpoint)
    main["state_dict"] = consensus_sd
    if consensus_opt is not None:
        main["optimizer_states"] = consensus_opt
    main[META_KEY] = meta
    atomic_write(filepath, _to_bytes(main))
    _fault_point("committed", filepath)
    for entry in os.listdir(root):
        if entry != save_id:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def remove(filepath: _PATH) -> None:
    """Delete main file ``filepath`` and its shards (a symlink loses only itself). Call on rank 0."""
    filepath = str(filepath)
    if os.path.islink(filepath):
        os.remove(filepath)
        return
    with suppress(FileNotFoundError):
        os.remove(filepath)
    shutil.rmtree(shard_root(filepath), ignore_errors=True)


# ----------------------------------------------------------------------------------------- resuming
def _check_own_shard(meta: dict[str, Any], filepath: str, world: int, rank: int) -> tuple[int, str, Optional[dict]]:
    """This rank's verdict on its shard: (status, reason, loaded shard when OK)."""
    where = f"rank {rank}"
    if meta.get("world_size") != world:
        return RESIZED, f"{where}: saved with {meta.get('world_size')} ranks, resuming with {world}", None
    save_dir = os.path.join(shard_root(filepath, resolve_links=True), meta["save_id"])
    manifest_path = os.path.join(save_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return MISSING, f"{where}: no shard manifest at {manifest_path}", None
    try:
        with open(manifest_path, "rb") as f:
            manifest = json.loads(f.read())
        entry = next(e for e in manifest["shards"] if e["rank"] == rank)
    except (ValueError, KeyError, TypeError, StopIteration) as err:
        return BAD, f"{where}: unreadable manifest {manifest_path} ({type(err).__name__}: {err})", None
    if manifest.get("save_id") != meta["save_id"] or manifest.get("fingerprint") != meta.get("fingerprint"):
        return BAD, f"{where}: manifest {manifest_path} belongs to another checkpoint or model", None
    path = os.path.join(save_dir, entry["file"])
    if not os.path.isfile(path):
        return MISSING, f"{where}: shard {path} is missing", None
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != entry["bytes"]:
        return BAD, f"{where}: shard {path} is truncated ({len(data)} of {entry['bytes']} bytes)", None
    if _sha256(data) != entry["sha256"]:
        return BAD, f"{where}: shard {path} is corrupt (SHA-256 does not match the manifest)", None
    try:
        shard = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad shard
        return BAD, f"{where}: shard {path} cannot be read ({type(err).__name__}: {err})", None
    if (shard.get("save_id"), shard.get("rank"), shard.get("fingerprint")) != (meta["save_id"], rank, meta.get("fingerprint")):
        return BAD, f"{where}: shard {path} is foreign (another save, rank or model)", None
    return OK, f"{where}: own shard verified", shard


def load(strategy: "DeslocStrategy", checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """Read the main file on every rank and, when fitting, pick and apply the local or consensus path."""
    filepath = str(checkpoint_path)
    main = strategy.checkpoint_io.load_checkpoint(filepath, weights_only=weights_only)
    module = strategy.lightning_module
    trainer = module._trainer if module is not None else None
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return main  # evaluation loads the consensus model: nothing per rank to restore
    world, rank = _world()
    meta = main.get(META_KEY)
    if not isinstance(meta, dict):
        decision = ResumeDecision("consensus", filepath, ["not a DES-LOC checkpoint: no shards"], None, world)
        steps = [int(main.get("global_step", 0))] if len(strategy.optimizers) == 1 else [0] * len(strategy.optimizers)
        _apply_consensus(strategy, main, {"optimizer_steps": steps}, decision)
        return main
    fingerprint = model_fingerprint(module)
    if meta.get("fingerprint") != fingerprint and module.strict_loading:
        raise CheckpointShardError(
            f"{filepath} was saved from a different model (fingerprint {meta.get('fingerprint')}, this model "
            f"{fingerprint}: parameter names, shapes or dtypes differ). Load a checkpoint of this model."
        )
    status, reason, shard = _check_own_shard(meta, filepath, world, rank)
    verdicts = _all_gather_object((status, reason), strategy)
    worst = max(s for s, _ in verdicts)
    reasons = [r for _, r in verdicts]
    decision = ResumeDecision("local" if worst == OK else "consensus", filepath, reasons, meta.get("world_size"), world)
    if worst == BAD and not strategy.allow_consensus_fallback:
        bad = "; ".join(r for s, r in verdicts if s == BAD)
        raise CheckpointShardError(
            f"Cannot resume from {filepath}: {bad}. Delete or restore the shards, or pass "
            "DeslocStrategy(allow_consensus_fallback=True) to start every rank from the consensus in the main file."
        )
    consensus_sd = main["state_dict"]
    if worst == OK:
        assert shard is not None
        _apply_local(strategy, main, shard, decision)
        _restore_sync_extras(strategy, consensus_sd, meta, shard)
        return main
    _apply_consensus(strategy, main, meta, decision)
    _restore_sync_extras(strategy, consensus_sd, meta, None)
    if worst == BAD:
        rank_zero_warn(
            f"DES-LOC resume from {filepath}: bad shards ({'; '.join(r for s, r in verdicts if s == BAD)}); "
            "allow_consensus_fallback=True, so every rank starts from the consensus in the main file."
        )
    elif worst == MISSING:
        rank_zero_warn(
            f"DES-LOC resume from {filepath}: shards missing ({'; '.join(r for s, r in verdicts if s == MISSING)}); "
            "every rank starts from the consensus parameters and optimizer states in the main file."
        )
    return main


def _restore_sync_extras(
    strategy: "DeslocStrategy", consensus_sd: dict[str, Any], meta: dict[str, Any], shard: Optional[dict[str, Any]]
) -> None:
    """Restore what the strategy keeps beside the optimizers (all support one optimizer):

    * periods chosen by ``param_sync_every="auto"`` (so a resumed run does not warm up again);
    * the outer optimizer (its global parameters and momentum), global and so in the main file; a
      checkpoint without it starts the outer optimizer afresh from the consensus parameters;
    * the compression memory: on the local path each rank's own delta anchor and error feedback from
      its shard, on the consensus path a fresh anchor at the consensus parameters (equal on every
      rank, as delta coding requires) and no residual.
    """
    if strategy.auto is not None and meta.get("auto_chosen"):
        k_x, periods = meta["auto_chosen"]
        strategy.auto.chosen = (int(k_x), dict(periods))
        policy = strategy.schedule.state_policy
        strategy.schedule = SyncSchedule(int(k_x), dict(periods) if policy == "average" else None, policy)
    if (strategy.outer is None and strategy.compression is None) or not strategy.optimizers:
        return
    module = strategy.lightning_module
    names = {id(p): n for n, p in module.named_parameters()}
    params = [p for g in strategy.optimizers[0].param_groups for p in g["params"]]
    consensus = [consensus_sd[names[id(p)]] if names.get(id(p)) in consensus_sd else p.detach() for p in params]
    if strategy.outer is not None:
        if meta.get("outer"):
            strategy.outer.load_state_dict(meta["outer"])
        else:
            strategy.outer.prime(consensus)
    if strategy.compression is not None:
        if shard is not None and shard.get("compression") is not None:
            strategy.compression.load_state_dict(shard["compression"])
        else:
            strategy.compression.categories.clear()
            strategy.compression.prime("params", consensus)


def _set_steps(strategy: "DeslocStrategy", steps: list[int]) -> None:
    n = len(strategy.optimizers)
    steps = [int(s) for s in steps][:n]
    strategy.optimizer_steps = steps + [0] * (n - len(steps))


def _apply_local(strategy: "DeslocStrategy", main: dict[str, Any], shard: dict[str, Any], decision: ResumeDecision) -> None:
    main["state_dict"] = shard["state_dict"]
    if shard.get("optimizer_states") is not None:
        main["optimizer_states"] = shard["optimizer_states"]
    _set_steps(strategy, shard["optimizer_steps"])
    strategy.ledger.load_state_dict(_merge_ledger(shard["ledger"], strategy.ledger.state_dict()))
    _restore_rng(shard["rng"])
    strategy._params_in_sync = False
    strategy.resume_decision = decision
    rank_zero_info(
        f"DES-LOC resume from {decision.checkpoint}: LOCAL path, each of the {decision.world_size} ranks restored "
        f"its own parameters, optimizer state and RNG at optimizer step {strategy.optimizer_steps}."
    )


def _apply_consensus(strategy: "DeslocStrategy", main: dict[str, Any], meta: dict[str, Any], decision: ResumeDecision) -> None:
    _set_steps(strategy, meta.get("optimizer_steps", []))
    if "ledger" in meta:
        strategy.ledger.load_state_dict(_merge_ledger(meta["ledger"], strategy.ledger.state_dict()))
    strategy._params_in_sync = True
    strategy.resume_decision = decision
    why = decision.reasons[0] if len(set(decision.reasons)) == 1 else "; ".join(decision.reasons)
    rank_zero_info(
        f"DES-LOC resume from {decision.checkpoint}: CONSENSUS path ({why}); all {decision.world_size} ranks start "
        f"from the averaged parameters and optimizer states at optimizer step {strategy.optimizer_steps}."
    )
