"""A real text corpus that is already on every machine: the Python standard library's own source.

Tokenizer: bytes. Token id = byte value, so the vocabulary has 256 entries and nothing is downloaded.

Preparation (``prepare_corpus``) turns ``.py`` files into fixed-length token blocks with
``litdata.optimize``, written as chunked shards in two directories, ``<data_dir>/train`` and
``<data_dir>/val``:

* files are taken in sorted path order until ``max_bytes`` is reached (``site-packages`` and the
  stdlib's own ``test`` suite are skipped), so the corpus is the same on every machine with the same
  Python version;
* every ``val_every``-th file goes to the validation split, the rest to training (split by file, so no
  block is shared between the splits);
* each file is one document: its bytes followed by one ``\\n`` separator, cut into non-overlapping
  blocks of ``block_size + 1`` tokens (input and shifted target); the tail shorter than a block is
  dropped.

Training streams the shards with ``litdata.StreamingDataset``/``StreamingDataLoader``: under
``torch.distributed`` each rank reads its own part of the chunks (equal item counts per rank).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize

VOCAB_SIZE = 256
SEPARATOR = b"\n"
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
MANIFEST = "corpus.json"


def stdlib_dir() -> str:
    """Where this interpreter's standard library sources live."""
    return sysconfig.get_paths()["stdlib"]


def collect_sources(source_dir: str, max_bytes: int, val_every: int) -> tuple[list[str], list[str]]:
    """``.py`` files under ``source_dir`` in sorted order, capped at ``max_bytes`` in all, split train/val.

    Returns ``(train_files, val_files)``: file ``i`` (0-based, in sorted order) is a validation file
    when ``i % val_every == val_every - 1``.
    """
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    files: list[str] = []
    for root, dirs, names in os.walk(source_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        files.extend(os.path.join(root, n) for n in names if n.endswith(".py"))
    files.sort(key=lambda p: os.path.relpath(p, source_dir))
    chosen: list[str] = []
    total = 0
    for path in files:
        size = os.path.getsize(path)
        if size == 0:
            continue
        if total + size > max_bytes and chosen:
            break
        chosen.append(path)
        total += size
    val = [p for i, p in enumerate(chosen) if i % val_every == val_every - 1]
    train = [p for i, p in enumerate(chosen) if i % val_every != val_every - 1]
    return train, val


def num_blocks(nbytes: int, block_size: int) -> int:
    """Blocks of ``block_size + 1`` tokens that one file of ``nbytes`` bytes gives (separator included)."""
    return (nbytes + len(SEPARATOR)) // (block_size + 1)


def file_blocks(path: str, block_size: int) -> Iterator[np.ndarray]:
    """``litdata.optimize`` worker function: one file in, its token blocks (``uint8``, length ``block_size + 1``) out."""
    data = Path(path).read_bytes() + SEPARATOR
    tokens = np.frombuffer(data, dtype=np.uint8)
    span = block_size + 1
    for i in range(len(tokens) // span):
        yield tokens[i * span : (i + 1) * span].copy()


def prepare_corpus(
    data_dir: str,
    source_dir: Optional[str] = None,
    max_bytes: int = 4_000_000,
    block_size: int = 128,
    val_every: int = 20,
    chunk_bytes: str = "1MB",
    num_workers: int = 1,
) -> dict:
    """Tokenise ``source_dir`` (default: the stdlib) into ``<data_dir>/train`` and ``<data_dir>/val``.

    Writes into a temporary directory next to ``data_dir`` and renames it at the end, so an interrupted
    preparation never leaves a half-written ``data_dir``. Returns the manifest (also written to
    ``<data_dir>/corpus.json``): files, bytes and blocks per split.
    """
    source_dir = source_dir or stdlib_dir()
    train, val = collect_sources(source_dir, max_bytes, val_every)
    if not train or not val:
        raise ValueError(
            f"found too few .py files under {source_dir!r} for a train/val split "
            f"(max_bytes={max_bytes}, val_every={val_every})"
        )
    target = Path(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        manifest: dict = {"source_dir": source_dir, "block_size": block_size, "vocab_size": VOCAB_SIZE}
        for split, files in (("train", train), ("val", val)):
            sizes = [os.path.getsize(p) for p in files]
            optimize(
                fn=functools.partial(file_blocks, block_size=block_size),
                inputs=files,
                output_dir=str(tmp / split),
                chunk_bytes=chunk_bytes,
                num_workers=num_workers,
                reorder_files=False,
                verbose=False,
                mode="overwrite",
            )
            manifest[split] = {
                "files": len(files),
                "bytes": sum(sizes),
                "blocks": sum(num_blocks(s, block_size) for s in sizes),
            }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _to_example(block: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One stored block of ``block_size + 1`` tokens -> ``(input, target)`` int64 tensors, target shifted by one."""
    tokens = torch.as_tensor(np.asarray(block), dtype=torch.long)
    return tokens[:-1], tokens[1:]


class StdlibDataModule(pl.LightningDataModule):
    """Byte-level language modelling on the Python standard library's ``.py`` files, streamed with litdata.

    Args:
        data_dir: where the optimized shards live (``train/``, ``val/``); prepared on first use.
        source_dir: the ``.py`` tree to read; ``None`` is this interpreter's standard library.
        max_bytes: cap on the source bytes read (both splits together).
        block_size: tokens per training example (the model's context length).
        val_every: every ``val_every``-th source file is held out for validation.
        batch_size: examples per batch on each rank.
        num_workers: DataLoader workers per rank.
        shuffle: shuffle the training stream (litdata shuffles chunks, then items within them).
        seed: shuffling seed.
    """

    def __init__(
        self,
        data_dir: str = "data/gpt-stdlib",
        source_dir: Optional[str] = None,
        max_bytes: int = 4_000_000,
        block_size: int = 128,
        val_every: int = 20,
        batch_size: int = 16,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.source_dir = source_dir
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.val_every = val_every
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.train_set: Optional[StreamingDataset] = None
        self.val_set: Optional[StreamingDataset] = None

    def _prepared(self) -> bool:
        manifest = Path(self.data_dir) / MANIFEST
        if not manifest.exists():
            return False
        meta = json.loads(manifest.read_text())
        if meta.get("block_size") != self.block_size:
            raise ValueError(
                f"{self.data_dir} holds blocks of {meta.get('block_size')} tokens, not {self.block_size}: "
                "choose another data_dir or delete it to prepare again"
            )
        return True

    def prepare_data(self) -> None:
        # Lightning calls this on local rank 0 only; the other ranks wait at a barrier.
        if not self._prepared():
            prepare_corpus(self.data_dir, self.source_dir, self.max_bytes, self.block_size, self.val_every)

    def setup(self, stage: str) -> None:
        self._prepared()
        if stage == "fit" and self.train_set is None:
            self.train_set = StreamingDataset(
                os.path.join(self.data_dir, "train"), shuffle=self.shuffle, seed=self.seed, transform=_to_example
            )
        if stage in ("fit", "validate") and self.val_set is None:
            self.val_set = StreamingDataset(os.path.join(self.data_dir, "val"), shuffle=False, transform=_to_example)

    def train_dataloader(self) -> StreamingDataLoader:
        assert self.train_set is not None
        return StreamingDataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> StreamingDataLoader:
        assert self.val_set is not None
        return StreamingDataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
