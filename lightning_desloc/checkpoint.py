"""Fault-tolerant DES-LOC checkpoints: a consensus main file plus one shard per rank.

Between averages every rank holds its own parameters and optimizer states, so one rank's copy is not
"the" model. A save therefore writes two things:

* the **main file** at the path the user asked for: an ordinary Lightning checkpoint whose
  ``state_dict`` and ``optimizer_states`` hold the *consensus* (defined below). Plain Lightning and
  ``LightningModule.load_from_checkpoint`` read it without this package. A ``"desloc"`` entry of plain
  values (ints, strings, lists, dicts) records the schedule position and which shards belong to it;
* **shards** in a sibling directory ``<main file>.shards/<save id>/``: ``rank-00000.pt``, ... with
  each rank's own parameters, optimizer state, RNG state, step counters and ledger, and a
  ``manifest.json`` (world size, step, SHA-256 and size of every shard and of the main file, model
  fingerprint).

**The consensus** is the model every rank would hold after the final consensus of a fit
(:meth:`DeslocSync.reach_consensus <lightning_desloc.sync.DeslocSync.reach_consensus>`) at the moment
of the save:

* every floating tensor of the module state dicts (parameters, floating buffers) is the mean over
  ranks; with ``outer_lr`` set and the parameters not in sync, the parameters of the (one) optimizer
  then get the outer step applied to that mean, computed on copies
  (:meth:`OuterOptimizer.peek <lightning_desloc.outer.OuterOptimizer.peek>`): so a ``last.ckpt`` saved
  before the end of fit equals the model fit returns. ``desloc.consensus_core`` then holds the outer
  optimizer's state after that step (new global parameters, new momentum), which a resume on the
  consensus path starts from; ``desloc.core`` holds the live state, which the local path continues;
* every averaged optimizer state (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...) is the mean
  over ranks (no outer step acts on states);
* counters (``step``), integer buffers and everything else are rank 0's: equal on every rank.

**What a save sends.** Nothing for what is equal on every rank right now: the module tensors when
:attr:`~lightning_desloc.sync.DeslocSync.params_in_sync`, the state keys in
:meth:`~lightning_desloc.sync.DeslocSync.states_in_sync` (averaged by the round right after the last
step), the parameters frozen since setup (:meth:`~lightning_desloc.sync.DeslocSync.is_frozen`), and,
during consensus validation, the module tensors (they hold the mean already; the strategy passes them
as ``module_means``). A save right after a round that averaged everything sends no checkpoint byte. The
rest is reduced to rank 0 alone (:meth:`Comm.reduce_mean_to_ <lightning_desloc.comm.Comm.reduce_mean_to_>`:
a sum, divided on rank 0) bucket by bucket, at most two buckets of ``bucket_cap_bytes`` in flight, each
bucket's mean copied to host memory (pinned for CUDA tensors) as it lands: the extra device memory is
about two buckets, not a model size. Bytes are recorded in the ledger as category ``"checkpoint"``.
Module state-dict entries are matched to the live tensors by storage (data pointer, size, dtype,
shape), so a tied weight with two names is sent once; optimizer state dicts hold the live state
tensors, indexed by parameter position. The ranks' live state is never changed.

Writes stream and are atomic: ``torch.save`` writes each file straight into a temporary name in its
final directory through a small wrapper that hashes (SHA-256) and counts the bytes on the way (no copy
of the file in memory); it is flushed, ``fsync``-ed and moved into place with ``os.replace``. Shards of a
new save go to a fresh ``<save id>`` directory; the main file, written last by rank 0 (its temporary
first, then the manifest that records its checksum, then the rename), is the commit point, and only after
it is in place are older save directories beside it deleted. A crash anywhere in a save leaves the
previous main file and the shards it names intact. A write that fails (a full disk) fails the save on
every rank alike: the failure rides on the shards' checksum all-gather, rank 0's outcome on a broadcast
after its commit, and every rank raises :class:`CheckpointWriteError` naming the files, with the failed
save's files removed.

On resume (``trainer.fit(ckpt_path=...)``) every rank reads the main file and checks its own shard
(SHA-256 read in chunks; files load with ``torch.load(..., mmap=True)``: tensors are read from the page
cache as they are used, not copied into memory first); the ranks then agree, in one small all-gather,
on one of two paths:

* **local**: same world size and every shard present and valid: each rank restores its own state and
  RNG; the run continues exactly as if it had not stopped;
* **consensus**: a different world size, a plain (non DES-LOC) checkpoint or missing shards: every
  rank starts from the consensus, so a new rank gets averaged momenta, not zeros.

The manifest also records the main file's SHA-256 and size; a main file that matches neither (bit
flips, truncation) raises :class:`CheckpointShardError` naming it, on every rank, before anything is
loaded. A truncated, corrupt (checksum mismatch) or foreign shard raises :class:`CheckpointShardError` on every
rank, unless the strategy was built with ``allow_consensus_fallback=True``, which takes the consensus
path with a warning instead. See ``docs/checkpointing.md``.

Example: the streaming writer hashes what ``torch.save`` writes through it::

    >>> import hashlib, io
    >>> sink = io.BytesIO()
    >>> writer = HashingWriter(sink)
    >>> torch.save({"w": torch.ones(3)}, writer)
    >>> writer.nbytes == len(sink.getvalue()), writer.sha256 == hashlib.sha256(sink.getvalue()).hexdigest()
    (True, True)
"""

from __future__ import annotations

import errno
import hashlib
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


class CheckpointWriteError(OSError):
    """A save could not write one of its files on some rank (a full disk, a quota, a read-only or vanished
    directory). Raised on **every** rank, naming each failed rank and file; ``errno`` is the first failure's
    (``errno.ENOSPC`` for a full disk). The previous checkpoint at that path is unchanged and no temporary
    file of this save is left behind."""


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


#: bytes read at a time when a file is hashed on resume (the whole file is never held in memory)
HASH_CHUNK_BYTES = 16 * 2**20


class HashingWriter:
    """A write-only file object for ``torch.save``: passes every byte on to ``file`` and keeps their
    SHA-256 (:attr:`sha256`, hex) and count (:attr:`nbytes`), so that a file is hashed as it is written.

    ``on_first_write`` is called once, right after the first bytes went through (flushed to the file):
    a crash there leaves a partly written file (the fault tests' "write" point)."""

    def __init__(self, file: Any, on_first_write: Optional[Callable[[], None]] = None) -> None:
        self.file = file
        self.nbytes = 0
        self._hash = hashlib.sha256()
        self._on_first_write = on_first_write

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.nbytes += view.nbytes
        written = self.file.write(view)
        if self._on_first_write is not None:
            hook, self._on_first_write = self._on_first_write, None
            self.file.flush()
            hook()
        return written

    def flush(self) -> None:
        self.file.flush()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def _temp_name(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_temp(path: str, write: Callable[[HashingWriter], None]) -> tuple[str, str, int]:
    """Write a new version of ``path`` under a temporary name in the same directory (so that the rename
    that commits it stays on one filesystem), flushed and ``fsync``-ed: ``(temp path, SHA-256, bytes)``.
    ``write`` gets the hashing file object. The temporary file is removed if anything fails."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            writer = HashingWriter(f, on_first_write=lambda: _fault_point("write", path))
            write(writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    return tmp, writer.sha256, writer.nbytes


def _commit(tmp: str, path: str) -> None:
    """Move a finished temporary file into place: ``path`` is its old content or all of the new one."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_save(path: str, obj: Any) -> tuple[str, int]:
    """``torch.save(obj)`` to ``path`` atomically, streamed: ``(SHA-256, bytes)`` of the file written."""
    tmp, digest, nbytes = _write_temp(path, lambda f: torch.save(obj, f))
    _commit(tmp, path)
    return digest, nbytes


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either its old content or all of ``data``."""
    _commit(_write_temp(path, lambda f: f.write(data))[0], path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> tuple[str, int]:
    """SHA-256 (hex) and size in bytes of the file at ``path``, read in chunks of :data:`HASH_CHUNK_BYTES`."""
    digest, nbytes = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            nbytes += len(chunk)
    return digest.hexdigest(), nbytes


def torch_load(path: str, **kwargs: Any) -> Any:
    """``torch.load(path, mmap=True, **kwargs)``: the storages are mapped from the file (``MAP_PRIVATE``:
    writing to a loaded tensor never changes the file) rather than read into memory first. Memory mapping
    needs a path and torch's zipfile format, which ``torch.save`` writes by default and this module
    always; a file in the legacy format loads without it."""
    try:
        return torch.load(path, mmap=True, **kwargs)
    except RuntimeError as err:
        if "mmap can only be used with files saved with" not in str(err):
            raise
        return torch.load(path, **kwargs)


def main_loader(checkpoint_io: Any, weights_only: Optional[bool] = None) -> Callable[[str], dict[str, Any]]:
    """How the strategies read a main file: with Lightning's default ``TorchCheckpointIO`` a local file is
    memory-mapped (:func:`torch_load`, tensors on the CPU as that plugin loads them); any other
    ``CheckpointIO`` (remote storage, a user's plugin) loads it its own way."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    def load(path: str) -> dict[str, Any]:
        if type(checkpoint_io) is not TorchCheckpointIO or "://" in str(path):
            return checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return torch_load(str(path), map_location=lambda storage, loc: storage, weights_only=weights_only)

    return load


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
def _write_failure(rank: int, path: str, err: BaseException) -> dict[str, Any]:
    """What a rank tells the others about a file it could not write: plain values, pickled in a collective."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        name = "ENOSPC" if code == errno.ENOSPC else "EDQUOT"
        why = f"the disk is full ({name}: {os.strerror(code)})"
    else:
        why = f"{type(err).__name__}: {err}"
    return {"rank": rank, "file": path, "errno": code, "why": why}


def _raise_write_failures(filepath: str, failures: Sequence[dict[str, Any]], own: Optional[BaseException]) -> None:
    """Raise :class:`CheckpointWriteError` on every rank for the failures all ranks now know about."""
    lines = "; ".join(f"rank {f['rank']} could not write {f['file']}: {f['why']}" for f in failures)
    code = next((f["errno"] for f in failures if f["errno"] is not None), errno.EIO)
    message = (f"Checkpoint save to {filepath} failed on every rank: {lines}. Nothing of this save was kept and the "
               f"previous checkpoint at {filepath} (if any) is unchanged. Free some space (or fix the directory) "
               "and save again, or resume from the previous checkpoint.")
    raise CheckpointWriteError(code, message) from own


StorageKey = tuple[int, int, torch.dtype, tuple[int, ...]]


def storage_key(t: Tensor) -> StorageKey:
    """Which memory ``t`` is: a state dict's detached alias of a live tensor has the same data pointer,
    size, dtype and shape (names do not identify it: a tied weight has two)."""
    return (t.data_ptr(), t.numel(), t.dtype, tuple(t.shape))


@dataclass
class _Mean:
    """One tensor of the main file: where its rank value is read, and where its consensus goes."""

    #: this rank's value (``reduce``), or a tensor that already holds the mean over ranks
    source: Tensor
    reduce: bool
    #: its offset in the outer step's flat parameters when the outer step applies to it, else ``None``
    outer_offset: Optional[int]
    #: ``(dict, key)`` places of the main file that get the consensus
    places: list[tuple[dict, Any]] = field(default_factory=list)

    def put(self, value: Tensor) -> None:
        for container, key in self.places:
            container[key] = value


def _to_host(t: Tensor) -> Tensor:
    """``t`` in host memory: itself on the CPU, else a copy in pinned memory (the copy waits for ``t``)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    host.copy_(t)
    return host


class _OuterPeek:
    """The outer step applied, slice by slice, to the consensus parameters of the main file, gathering the
    outer optimizer's state after it (new global parameters and momentum) in host memory on rank 0."""

    def __init__(self, outer: Any, params: Sequence[Tensor]) -> None:
        self.outer = outer
        flat = outer.snapshot.flat
        pinned = flat.device.type != "cpu"
        # both in the snapshot's dtype, as the live ones (the momentum buffer starts as a clone of g); in
        # host memory on purpose: they go into the main file, never into a collective
        host = torch.device("cpu")
        self.snapshot = torch.empty(flat.numel(), dtype=flat.dtype, device=host, pin_memory=pinned)
        self.momentum = (torch.empty(flat.numel(), dtype=flat.dtype, device=host, pin_memory=pinned)
                         if outer.momentum else None)
        #: storage of each parameter -> its offset in the flat parameters; offset -> numel
        self.offsets: dict[StorageKey, int] = {}
        self.sizes: dict[int, int] = {}
        offset = 0
        for p in params:
            self.offsets.setdefault(storage_key(p), offset)
            self.sizes[offset] = p.numel()
            offset += p.numel()
        self.done: set[int] = set()

    def apply_(self, mean: Tensor, offset: int) -> None:
        """Overwrite ``mean`` (one parameter's mean over ranks) by the new global parameters."""
        x_g, buffer = self.outer.peek(mean.reshape(-1), offset)
        n = mean.numel()
        self.snapshot[offset : offset + n].copy_(x_g)
        if self.momentum is not None and buffer is not None:
            self.momentum[offset : offset + n].copy_(buffer)
        mean.copy_(x_g.view_as(mean))  # rounded to the parameter's dtype, as the live step copies it
        self.done.add(offset)

    def state_after(self) -> Optional["OuterState"]:
        """The outer optimizer's state after the peeked step, or ``None`` when some parameter of the
        optimizer was not in the checkpoint (its mean is unknown, so the new global parameters are too)."""
        if set(self.sizes) - self.done:
            return None
        return OuterState(self.outer.name, self.snapshot, self.momentum)


@dataclass
class OuterState:
    """The outer optimizer's state after the step :func:`consensus` applied to the main file's parameters:
    the new global parameters (flat, the snapshot's dtype) and momentum buffer (``None`` without momentum),
    on the host."""

    option_name: str
    snapshot: Tensor
    momentum_buffer: Optional[Tensor]

    def shared(self, shared: dict[str, Any]) -> dict[str, Any]:
        """The core's shared state ``shared`` (:meth:`DeslocSync.state_dict`) with this state in place of
        the outer optimizer's: what the core would save right after that step."""
        options = {**(shared.get("options") or {}), self.option_name: {"momentum_buffer": self.momentum_buffer}}
        return {**shared, "snapshot": {"flat": self.snapshot}, "options": options}


def consensus(
    core: "DeslocSync",
    checkpoint: dict[str, Any],
    layout: Layout = Layout(),
    *,
    modules: Sequence[Module] = (),
    module_means: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
) -> tuple[dict[str, Any], Optional[OuterState]]:
    """The main file's checkpoint (on rank 0; the other ranks get a dict they need not write) and, when the
    outer step was applied to it, the outer optimizer's state after that step (else ``None``). Call on
    every rank: the tensors that differ between ranks are reduced to rank 0 (see the module docstring).

    ``checkpoint`` holds this rank's own values where ``layout`` says and is not modified; ``modules``
    are the live modules (to recognise frozen parameters by storage); ``module_means`` maps a module key
    of ``layout`` to a state dict whose floating tensors already hold the mean over ranks (the live
    tensors during consensus validation)."""
    comm = core.comm
    distributed = comm.distributed
    live: dict[StorageKey, Tensor] = {}
    for t in [*(t for m in modules for t in (*m.parameters(), *m.buffers())),
              *(p for opt in core.optimizers for g in opt.param_groups for p in g["params"])]:
        live.setdefault(storage_key(t), t)
    outer = None  # the outer step on the consensus: computed on rank 0, which alone writes the main file
    if not core.params_in_sync and core.optimizers and comm.rank == 0:
        from lightning_desloc.outer import OuterOptimizer

        option = core.option(OuterOptimizer)
        if option is not None and option.snapshot.flat is not None:
            outer = _OuterPeek(option, [p for g in core.optimizers[0].param_groups for p in g["params"]])
    means: dict[StorageKey, _Mean] = {}

    def need(container: dict, name: Any, source: Tensor, reduce: bool, in_module: bool) -> None:
        key = storage_key(source)
        offset = outer.offsets.get(key) if outer is not None and in_module else None
        mean = means.setdefault(key, _Mean(source, reduce, offset))
        mean.places.append((container, name))
        if not mean.reduce and mean.outer_offset is None:
            container[name] = source  # equal on every rank (or already the mean): written as it is

    out = dict(checkpoint)
    for key in layout.modules:
        state_dict = checkpoint.get(key)
        if not isinstance(state_dict, Mapping):
            continue
        out[key] = dict(state_dict)
        if core.params_in_sync:
            continue  # every module tensor is equal on every rank: the values as they are
        given = (module_means or {}).get(key) or {}
        for name, value in state_dict.items():
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() == 0:
                continue
            if isinstance(given.get(name), Tensor):
                need(out[key], name, given[name], reduce=False, in_module=True)
                continue
            match = live.get(storage_key(value))
            frozen = match is not None and core.is_frozen(match)
            need(out[key], name, value, reduce=distributed and not frozen, in_module=True)
    if layout.optimizer_list is not None and checkpoint.get(layout.optimizer_list) is not None:
        out[layout.optimizer_list] = list(checkpoint[layout.optimizer_list])
    for key, position, index in layout.optimizer_entries(checkpoint):
        osd = layout.get(checkpoint, key, position)
        params = [p for g in core.optimizers[index].param_groups for p in g["params"]] if index < len(core.optimizers) else []
        in_sync = core.states_in_sync(index)
        state: dict[Any, Any] = {}
        for idx, per_param in osd.get("state", {}).items():
            p = params[idx] if isinstance(idx, int) and idx < len(params) else None
            state[idx] = dict(per_param)
            if not distributed or (p is not None and core.is_frozen(p)):
                continue
            for k, v in per_param.items():
                if is_averaged(k, v, p) and v.numel() > 0 and k not in in_sync:
                    need(state[idx], k, v, reduce=True, in_module=False)
        if position is None:
            out[key] = {**osd, "state": state}
        else:
            out[key][position] = {**osd, "state": state}

    by_id = {id(m.source): m for m in means.values()}

    def receive(bucket: Sequence[Tensor], flat: Tensor) -> None:
        # on rank 0: the outer step on this bucket's parameters, on the device, then one copy to the host
        offset, slices = 0, []
        for t in bucket:
            mean = by_id[id(t)]
            segment = flat[offset : offset + t.numel()]
            if outer is not None and mean.outer_offset is not None:
                outer.apply_(segment, mean.outer_offset)
            slices.append((mean, offset, t))
            offset += t.numel()
        host = _to_host(flat)
        for mean, start, t in slices:
            mean.put(host[start : start + t.numel()].view_as(t))

    reduced = [m.source for m in means.values() if m.reduce]
    comm.reduce_mean_to_(reduced, receive, dst=0, category=LEDGER_CATEGORY, bucket_cap_bytes=core.bucket_cap_bytes)
    if outer is None:
        return out, None
    with torch.no_grad():
        for mean in means.values():  # the means already in place: the outer step, one tensor at a time
            if not mean.reduce and mean.outer_offset is not None:
                value = mean.source.detach().clone()
                outer.apply_(value, mean.outer_offset)
                mean.put(_to_host(value))
    return out, outer.state_after()


def save(
    core: "DeslocSync",
    checkpoint: dict[str, Any],
    filepath: Any,
    layout: Layout = Layout(),
    *,
    modules: Sequence[Module] = (),
    module_means: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
) -> None:
    """Write the consensus main file at ``filepath`` and this rank's shard beside it. Call on every rank.

    ``checkpoint`` holds this rank's own values (where ``layout`` says); the main file gets their
    consensus (:func:`consensus`, with ``modules`` and ``module_means``) and the core's shared state, the
    shard the values as they are and the core's local state."""
    filepath = str(filepath)
    core.settle_control()  # on_nonfinite: raise, or heal every rank fully, before anything is saved
    core.check_finite_now("a checkpoint save")  # on_nonfinite: a rank that went non-finite since that round, too
    comm = core.comm
    world, rank = comm.world_size, comm.rank
    fingerprint = model_fingerprint([checkpoint[k] for k in layout.modules if isinstance(checkpoint.get(k), Mapping)])
    step = int(checkpoint.get("global_step", core.optimizer_steps[0] if core.optimizer_steps else 0))
    save_id = comm.broadcast_object(f"step{step}-{uuid.uuid4().hex[:12]}", src=0)
    main, outer_after = consensus(core, checkpoint, layout, modules=modules, module_means=module_means)
    # after the consensus, so that the ledgers saved (shards and main file) include this save's bytes, as
    # the run that goes on from here has them
    core_state = core.state_dict()

    # 1. every rank writes its own shard into the new save directory. A rank that cannot (a full disk) must
    # not raise alone: the others would wait for it in the next collective. Its failure rides on the
    # checksums' all-gather, and every rank raises the same CheckpointWriteError
    root = shard_root(filepath)
    save_dir = os.path.join(root, save_id)
    shard_path = os.path.join(save_dir, shard_name(rank))
    digest, nbytes, failure, own_error = "", 0, None, None
    try:
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
        digest, nbytes = atomic_save(shard_path, shard)
        del shard
        _fault_point("shard_written", filepath)
    except Exception as err:  # noqa: BLE001 - every kind of write failure becomes the verdict of every rank
        failure, own_error = _write_failure(rank, shard_path, err), err
    gathered = comm.all_gather_object({"rank": rank, "file": shard_name(rank), "sha256": digest, "bytes": nbytes,
                                       "failure": failure})
    failures = [e["failure"] for e in gathered if e.get("failure")]
    if failures:
        with suppress(OSError):
            os.remove(shard_path)  # this rank's shard, if it was written: the save it belongs to never commits
        if rank == 0:
            shutil.rmtree(save_dir, ignore_errors=True)
        _raise_write_failures(filepath, failures, own_error)
    entries = [{k: v for k, v in e.items() if k != "failure"} for e in gathered]
    # 2. rank 0 writes the main file; its success or failure is broadcast, so that no rank goes on while
    # rank 0 raises (the others would wait for it in their next collective)
    failure, own_error = None, None
    if rank == 0:
        try:
            _write_main(filepath, save_dir, main, core_state, layout, checkpoint, outer_after, entries,
                        save_id=save_id, world=world, step=step, fingerprint=fingerprint, core=core)
        except Exception as err:  # noqa: BLE001 - as above
            failure, own_error = _write_failure(0, getattr(err, "desloc_file", filepath), err), err
            shutil.rmtree(save_dir, ignore_errors=True)
    failure = comm.broadcast_object(failure, src=0)
    if failure is not None:
        _raise_write_failures(filepath, [failure], own_error)
    if rank != 0:
        return
    _fault_point("committed", filepath)
    for entry in os.listdir(root):
        if entry != save_id:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _write_main(filepath: str, save_dir: str, main: dict[str, Any], core_state: dict[str, Any], layout: Layout,
                checkpoint: dict[str, Any], outer_after: Optional["OuterState"], entries: list[dict[str, Any]], *,
                save_id: str, world: int, step: int, fingerprint: str, core: "DeslocSync") -> None:
    """Rank 0: the main file under a temporary name, the manifest with its checksum, then the rename that
    commits the save. An error carries the file it concerns as ``desloc_file``; no temporary file survives it."""
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
    if outer_after is not None:
        meta["consensus_core"] = outer_after.shared(shared)
    main[META_KEY] = meta
    try:
        tmp, main_digest, main_bytes = _write_temp(filepath, lambda f: torch.save(main, f))
    except Exception as err:
        err.desloc_file = filepath  # type: ignore[attr-defined]
        raise
    manifest = {k: meta[k] for k in ("format", "save_id", "world_size", "global_step", "optimizer_steps", "fingerprint")}
    manifest["shards"] = sorted(entries, key=lambda e: e["rank"])
    manifest["main"] = {"sha256": main_digest, "bytes": main_bytes}
    manifest_path = os.path.join(save_dir, MANIFEST_NAME)
    try:
        atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())
    except BaseException as err:
        with suppress(OSError):
            os.remove(tmp)
        err.desloc_file = manifest_path  # type: ignore[attr-defined]
        raise
    try:
        _commit(tmp, filepath)
    except Exception as err:
        err.desloc_file = filepath  # type: ignore[attr-defined]
        raise


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
    size = os.path.getsize(path)
    if size < entry["bytes"]:
        return BAD, f"{where}: shard {path} is truncated ({size} of {entry['bytes']} bytes)", None
    if size > entry["bytes"]:
        return BAD, (f"{where}: shard {path} has {size} bytes, its manifest says {entry['bytes']} "
                     "(overwritten by another file?)"), None
    if file_digest(path)[0] != entry["sha256"]:
        return BAD, f"{where}: shard {path} is corrupt (SHA-256 does not match the manifest)", None
    try:
        shard = torch_load(path, map_location="cpu", weights_only=True)
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
    digest, size = file_digest(filepath)
    if any(entry["sha256"] == digest for _, entry in recorded):
        return None
    save_id, entry = recorded[-1]
    if size != entry["bytes"]:
        return (f"checkpoint {filepath} is damaged: it has {size} bytes, but the save that wrote it "
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
    # the main file's parameters are the consensus after the outer step when one was peeked at the save:
    # the outer optimizer continues from the state after that step
    shared = meta.get("consensus_core") or shared
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
