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
  ``manifest.json`` (world size, step, SHA-256 and size of every shard and of the main file, model
  fingerprint).

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

The manifest also records the main file's SHA-256 and size; a main file that matches neither (bit
flips, truncation) raises :class:`CheckpointShardError` naming it, on every rank, before anything is
loaded. A truncated, corrupt (checksum mismatch) or foreign shard raises :class:`CheckpointShardError` on every
rank, unless the strategy was built with ``allow_consensus_fallback=True``, which takes the consensus
path with a warning instead. See ``docs/checkpointing.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor
from torch.nn import Module

from lightning_desloc.options import is_averaged

if TYPE_CHECKING:
    from lightning_desloc.sync import DeslocSync

FORMAT_VERSION = 2
#: key of the DES-LOC metadata in the main checkpoint file
META_KEY = "desloc"
SHARDS_SUFFIX = ".shards"
MANIFEST_NAME = "manifest.json"
LEDGER_CATEGORY = "checkpoint"

# shard status codes, from good to bad; the ranks take the worst one
OK, RESIZED, MISSING, BAD = 0, 1, 2, 3


class CheckpointShardError(RuntimeError):
    """A shard of a DES-LOC checkpoint is truncated, corrupt or belongs to another checkpoint or model."""


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint dict keeps what DES-LOC averages and restores per rank.

    The Trainer's checkpoint keeps the module's state dict under ``"state_dict"`` and a list of optimizer
    state dicts (in the order of the core's optimizers) under ``"optimizer_states"``: the defaults.
    A Fabric checkpoint keeps whatever the user named: ``modules`` and ``optimizers`` list those keys
    (an optimizer key maps to the optimizer's index among the core's)."""

    modules: tuple[str, ...] = ("state_dict",)
    optimizer_list: Optional[str] = "optimizer_states"
    optimizers: Mapping[str, int] = field(default_factory=dict)

    def optimizer_entries(self, checkpoint: Mapping[str, Any]) -> list[tuple[str, Optional[int], int]]:
        """``(key, position in the list or None, optimizer index)`` of every optimizer state dict present."""
        out: list[tuple[str, Optional[int], int]] = []
        if self.optimizer_list is not None and checkpoint.get(self.optimizer_list) is not None:
            out.extend((self.optimizer_list, i, i) for i in range(len(checkpoint[self.optimizer_list])))
        out.extend((key, None, index) for key, index in self.optimizers.items() if checkpoint.get(key) is not None)
        return out

    def get(self, checkpoint: Mapping[str, Any], key: str, position: Optional[int]) -> Any:
        return checkpoint[key] if position is None else checkpoint[key][position]


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


def shard_root(filepath: Any, resolve_links: bool = False) -> str:
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


def model_fingerprint(module: Any) -> str:
    """Hash of the state-dict keys, shapes and dtypes of a module (or of a list of modules' state dicts):
    equal for the same architecture, else different."""
    parts = [module] if isinstance(module, Module) else list(module)
    state_dicts = [m.state_dict() if isinstance(m, Module) else m for m in parts]
    items = [(name, list(t.shape), str(t.dtype)) for sd in state_dicts for name, t in sd.items() if isinstance(t, Tensor)]
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


# ----------------------------------------------------------------------------------------- saving
def consensus_copies(core: "DeslocSync", checkpoint: dict[str, Any], layout: Layout = Layout()) -> dict[str, Any]:
    """A copy of ``checkpoint`` whose module and optimizer state dicts have every averaged tensor replaced
    by its mean over ranks, in one coalesced round (ledger category ``"checkpoint"``). The input is not
    modified; counters (``step``) and integer buffers stay as they are (equal on every rank)."""
    tensors: list[Tensor] = []

    def copy(t: Tensor) -> Tensor:
        c = t.detach().clone()
        tensors.append(c)
        return c

    out = dict(checkpoint)
    for key in layout.modules:
        if isinstance(checkpoint.get(key), Mapping):
            out[key] = {k: copy(v) if isinstance(v, Tensor) and v.is_floating_point() else v
                        for k, v in checkpoint[key].items()}
    if layout.optimizer_list is not None and checkpoint.get(layout.optimizer_list) is not None:
        out[layout.optimizer_list] = list(checkpoint[layout.optimizer_list])
    for key, position, index in layout.optimizer_entries(checkpoint):
        osd = layout.get(checkpoint, key, position)
        params = [p for g in core.optimizers[index].param_groups for p in g["params"]] if index < len(core.optimizers) else []
        state = {}
        for idx, per_param in osd.get("state", {}).items():
            p = params[idx] if isinstance(idx, int) and idx < len(params) else None
            state[idx] = {k: copy(v) if is_averaged(k, v, p) else v for k, v in per_param.items()}
        if position is None:
            out[key] = {**osd, "state": state}
        else:
            out[key][position] = {**osd, "state": state}
    core.comm.average_({LEDGER_CATEGORY: tensors}, bucket_cap_bytes=core.bucket_cap_bytes)
    return out


def save(core: "DeslocSync", checkpoint: dict[str, Any], filepath: Any, layout: Layout = Layout()) -> None:
    """Write the consensus main file at ``filepath`` and this rank's shard beside it. Call on every rank.

    ``checkpoint`` holds this rank's own values (where ``layout`` says); the main file gets their mean
    and the core's shared state, the shard the values as they are and the core's local state."""
    filepath = str(filepath)
    comm = core.comm
    world, rank = comm.world_size, comm.rank
    fingerprint = model_fingerprint([checkpoint[k] for k in layout.modules if isinstance(checkpoint.get(k), Mapping)])
    step = int(checkpoint.get("global_step", core.optimizer_steps[0] if core.optimizer_steps else 0))
    save_id = comm.broadcast_object(f"step{step}-{uuid.uuid4().hex[:12]}", src=0)
    core_state = core.state_dict()

    consensus = consensus_copies(core, checkpoint, layout)

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
        "optimizer_steps": list(core.optimizer_steps),
        **{k: checkpoint.get(k) for k in layout.modules},
        **({layout.optimizer_list: checkpoint.get(layout.optimizer_list)} if layout.optimizer_list else {}),
        **{k: checkpoint[k] for k, _, _ in layout.optimizer_entries(checkpoint)},
        "ledger": core.ledger.state_dict(),  # this rank's, also inside "core"; read by tools
        "core": core_state["local"],
        "rng": _capture_rng(),
    }
    data = _to_bytes(shard)
    atomic_write(os.path.join(save_dir, shard_name(rank)), data)
    _fault_point("shard_written", filepath)
    entries = comm.all_gather_object({"rank": rank, "file": shard_name(rank), "sha256": _sha256(data), "bytes": len(data)})
    if rank != 0:
        return

    # 2. rank 0: the manifest, then the main file (the commit point), then old saves are removed
    shared = core_state["shared"]
    meta = {
        "format": FORMAT_VERSION,
        "save_id": save_id,
        "world_size": world,
        "global_step": step,
        "optimizer_steps": list(core.optimizer_steps),
        "fingerprint": fingerprint,
        "schedule": shared["schedule"],
        "ledger": shared["ledger"],
        "weights_only": not layout.optimizer_entries(checkpoint),
        # equal on every rank, so rank 0's copy is the global one
        "core": shared,
    }
    consensus[META_KEY] = meta
    main_data = _to_bytes(consensus)
    manifest = {k: meta[k] for k in ("format", "save_id", "world_size", "global_step", "optimizer_steps", "fingerprint")}
    manifest["shards"] = sorted(entries, key=lambda e: e["rank"])
    manifest["main"] = {"sha256": _sha256(main_data), "bytes": len(main_data)}
    atomic_write(os.path.join(save_dir, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    atomic_write(filepath, main_data)
    _fault_point("committed", filepath)
    for entry in os.listdir(root):
        if entry != save_id:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def remove(filepath: Any) -> None:
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
    """This rank's verdict on its shard: (status, reason, loaded shard when OK). Never raises: a rank
    that raised here alone would leave the others waiting in the verdict all-gather."""
    try:
        return _verify_own_shard(meta, filepath, world, rank)
    except Exception as err:  # noqa: BLE001 - a damaged manifest or shard of any kind
        return BAD, f"rank {rank}: cannot check its shard of {filepath} ({type(err).__name__}: {err})", None


def _verify_own_shard(meta: dict[str, Any], filepath: str, world: int, rank: int) -> tuple[int, str, Optional[dict]]:
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
    if len(data) < entry["bytes"]:
        return BAD, f"{where}: shard {path} is truncated ({len(data)} of {entry['bytes']} bytes)", None
    if len(data) > entry["bytes"]:
        return BAD, (f"{where}: shard {path} has {len(data)} bytes, its manifest says {entry['bytes']} "
                     "(overwritten by another file?)"), None
    if _sha256(data) != entry["sha256"]:
        return BAD, f"{where}: shard {path} is corrupt (SHA-256 does not match the manifest)", None
    try:
        shard = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad shard
        return BAD, f"{where}: shard {path} cannot be read ({type(err).__name__}: {err})", None
    if (shard.get("save_id"), shard.get("rank"), shard.get("fingerprint")) != (meta["save_id"], rank, meta.get("fingerprint")):
        return BAD, f"{where}: shard {path} is foreign (another save, rank or model)", None
    return OK, f"{where}: own shard verified", shard


def main_file_problem(filepath: str) -> Optional[str]:
    """Why the main file does not match the manifest of its save, or ``None`` (it matches, or no manifest
    records its checksum: a file copied without its shards, or saved before format 2 recorded it).

    A crash during a save can leave two save directories (the new one's main file never landed), so the
    file must match one of them."""
    root = shard_root(filepath, resolve_links=True)
    recorded: list[tuple[str, dict[str, Any]]] = []
    with suppress(OSError):
        for save_id in sorted(os.listdir(root)):
            with suppress(OSError, ValueError, KeyError, TypeError):
                with open(os.path.join(root, save_id, MANIFEST_NAME), "rb") as f:
                    main = json.loads(f.read())["main"]
                recorded.append((save_id, {"sha256": str(main["sha256"]), "bytes": int(main["bytes"])}))
    if not recorded:
        return None
    with open(filepath, "rb") as f:
        data = f.read()
    digest = _sha256(data)
    if any(entry["sha256"] == digest for _, entry in recorded):
        return None
    save_id, entry = recorded[-1]
    if len(data) != entry["bytes"]:
        return (f"checkpoint {filepath} is damaged: it has {len(data)} bytes, but the save that wrote it "
                f"({save_id}) recorded {entry['bytes']} (truncated or overwritten)")
    return f"checkpoint {filepath} is corrupt: its SHA-256 does not match the manifest of its save ({save_id})"


def read_main(filepath: Any, loader: Callable[[str], dict[str, Any]]) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """Read the main file with ``loader`` (the strategy's CheckpointIO) after checking it against its
    manifest: ``(checkpoint, None)``, or ``(None, why it cannot be used)`` naming the file. A missing file
    raises as the loader does."""
    filepath = str(filepath)
    problem = main_file_problem(filepath) if os.path.isfile(filepath) else None
    if problem is not None:
        return None, problem
    try:
        main = loader(filepath)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - an unpickling failure of any kind means a damaged file
        return None, f"cannot read checkpoint {filepath} ({type(err).__name__}: {err}); the file is damaged or not a checkpoint"
    if isinstance(main, Mapping) and META_KEY not in main and {"save_id", "rank", "world_size"} <= set(main):
        return None, (f"{filepath} is rank {main['rank']}'s shard of a DES-LOC checkpoint, not a checkpoint: pass "
                      f"the main file beside the {SHARDS_SUFFIX} directory it lies in")
    return main, None


def check_main(core: "DeslocSync", problem: Optional[str]) -> None:
    """Raise :class:`CheckpointShardError` on every rank if the main file failed :func:`read_main` on any."""
    problems = core.comm.all_gather_object(problem) if core.comm.distributed else [problem]
    bad = sorted({p for p in problems if p})
    if bad:
        raise CheckpointShardError(f"Cannot resume: {'; '.join(bad)}. Restore the file or pass another checkpoint.")


def load(
    core: "DeslocSync",
    filepath: Any,
    main: dict[str, Any],
    *,
    modules: Sequence[Module],
    layout: Layout = Layout(),
    strict: bool = True,
    allow_consensus_fallback: bool = False,
    info: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> tuple[dict[str, Any], ResumeDecision]:
    """Resume from the main file ``main`` (already read from ``filepath``) on every rank: pick the local or
    the consensus path with the other ranks, restore the core's state (and on the local path the RNG), and
    return the checkpoint to load into the modules and optimizers (this rank's own values on the local
    path, the consensus otherwise) with the decision. ``modules`` are the live modules whose state dicts
    ``layout.modules`` hold (for the fingerprint); ``strict``: a different model is an error."""
    filepath = str(filepath)
    comm = core.comm
    world, rank = comm.world_size, comm.rank
    device = _device_of(core)
    meta = main.get(META_KEY)
    if not isinstance(meta, dict):
        decision = ResumeDecision("consensus", filepath, ["not a DES-LOC checkpoint: no shards"], None, world)
        steps = [int(main.get("global_step", 0))] if len(core.optimizers) == 1 else [0] * len(core.optimizers)
        core.set_steps(steps)
        _take_snapshot(core, main, layout, modules)
        core.params_in_sync = True
        _say_consensus(core, decision, info)
        return main, decision
    fingerprint = model_fingerprint(list(modules))
    if meta.get("fingerprint") != fingerprint and strict:
        raise CheckpointShardError(
            f"{filepath} was saved from a different model (fingerprint {meta.get('fingerprint')}, this model "
            f"{fingerprint}: parameter names, shapes or dtypes differ). Load a checkpoint of this model."
        )
    status, reason, shard = _check_own_shard(meta, filepath, world, rank)
    verdicts = comm.all_gather_object((status, reason))
    worst = max(s for s, _ in verdicts)
    reasons = [r for _, r in verdicts]
    decision = ResumeDecision("local" if worst == OK else "consensus", filepath, reasons, meta.get("world_size"), world)
    bad = "; ".join(r for s, r in verdicts if s == BAD)
    if worst == BAD and not allow_consensus_fallback:
        raise CheckpointShardError(
            f"Cannot resume from {filepath}: {bad}. Delete or restore the shards, or pass "
            "DeslocStrategy(allow_consensus_fallback=True) to start every rank from the consensus in the main file."
        )
    shared = meta.get("core") or _shared_from_v1(meta)
    if worst == OK:
        assert shard is not None
        out = dict(main)
        for key in (*layout.modules, *(k for k, _, _ in layout.optimizer_entries(shard))):
            if shard.get(key) is not None:
                out[key] = shard[key]
        core.load_state_dict({"shared": shared, "local": shard.get("core") or _local_from_v1(shard)}, device)
        if shared.get("snapshot") is None:
            _take_snapshot(core, main, layout, modules)
        _restore_rng(shard["rng"])
        core.params_in_sync = False
        what = "parameters" if meta.get("weights_only") else "parameters, optimizer state"
        info(f"DES-LOC resume from {decision.checkpoint}: LOCAL path, each of the {decision.world_size} ranks "
             f"restored its own {what} and RNG at optimizer step {core.optimizer_steps}.")
        return out, decision
    core.load_state_dict({"shared": shared, "local": None}, device)
    if shared.get("snapshot") is None:
        _take_snapshot(core, main, layout, modules)
    core.params_in_sync = True
    _say_consensus(core, decision, info)
    if worst == BAD:
        warn(f"DES-LOC resume from {filepath}: bad shards ({bad}); "
             "allow_consensus_fallback=True, so every rank starts from the consensus in the main file.")
    elif worst == MISSING:
        warn(f"DES-LOC resume from {filepath}: shards missing ({'; '.join(r for s, r in verdicts if s == MISSING)}); "
             "every rank starts from the consensus parameters and optimizer states in the main file.")
    return main, decision


def _say_consensus(core: "DeslocSync", decision: ResumeDecision, info: Callable[[str], None]) -> None:
    why = decision.reasons[0] if len(set(decision.reasons)) == 1 else "; ".join(decision.reasons)
    info(f"DES-LOC resume from {decision.checkpoint}: CONSENSUS path ({why}); all {decision.world_size} ranks start "
         f"from the averaged parameters and optimizer states at optimizer step {core.optimizer_steps}.")


def _device_of(core: "DeslocSync") -> Optional[torch.device]:
    for opt in core.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                return p.device
    return None


def _take_snapshot(core: "DeslocSync", main: dict[str, Any], layout: Layout, modules: Sequence[Module]) -> None:
    """A checkpoint without a saved snapshot (plain Lightning, or an older format): the consensus
    parameters in the main file are the last global parameters (equal on every rank)."""
    if not core.keeps_snapshot or not core.optimizers or not layout.modules or not modules:
        return
    state_dict = main.get(layout.modules[0])
    if not isinstance(state_dict, Mapping):
        return
    names = {id(p): n for n, p in modules[0].named_parameters()}
    params = [p for g in core.optimizers[0].param_groups for p in g["params"]]
    core.snapshot.take([state_dict[names[id(p)]].to(p.device) if names.get(id(p)) in state_dict else p.detach()
                        for p in params])


def _shared_from_v1(meta: dict[str, Any]) -> dict[str, Any]:
    """The core's shared state from a format-1 main file (before the core kept its own state dict)."""
    outer = meta.get("outer") or {}
    buf = None
    with suppress(KeyError, IndexError, TypeError):
        buf = outer["optimizer"]["state"][0]["momentum_buffer"]
    return {
        "optimizer_steps": meta.get("optimizer_steps", []),
        "schedule": meta.get("schedule"),
        "snapshot": {"flat": outer["anchor"]} if outer.get("anchor") is not None else None,
        "options": {"auto": {"chosen": meta.get("auto_chosen")}, "outer": {"momentum_buffer": buf}},
        "ledger": meta.get("ledger"),
    }


def _local_from_v1(shard: dict[str, Any]) -> dict[str, Any]:
    compression = {k: {"residual": v.get("residual")} for k, v in (shard.get("compression") or {}).items()}
    return {"optimizer_steps": shard["optimizer_steps"], "ledgers": {"world": shard["ledger"]},
            "options": {"compression": compression}}
