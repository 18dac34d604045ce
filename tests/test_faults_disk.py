"""A checkpoint save that runs out of disk space (issue 15), on real gloo processes and a real full disk.

A small tmpfs is mounted under the test's directory (root only; the tests skip otherwise) and holds the
checkpoints of a 2-rank fit that overwrites ``ckpt.ckpt`` every 3 steps. After the step-3 save rank 0
fills the disk (a filler file), so that the step-6 save cannot be written:

* ``"everything"``: no byte left, every rank's shard write fails;
* ``"main file"``: room for both shards but not for the main file, so only rank 0 fails, after the
  shards' all-gather; before this was a shared verdict the other rank went on and waited in its next
  collective.

Expected: every rank raises ``CheckpointWriteError`` (an ``OSError``, ``errno.ENOSPC``) at the same step,
naming the file and saying the disk is full; the fit ends within seconds; the step-3 checkpoint (main
file, shards, manifest) is unchanged byte for byte, nothing else is left on the disk (no temporary file,
no directory of the failed save), and the fit resumes from it on the local path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ckpt_models import Net, Recorder
from helpers import START_METHOD
from lightning_desloc import DeslocStrategy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PERIODS = dict(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12})
HIDDEN = 64  # shards and main file of about 20 KiB each: several tmpfs pages
PAGE = 4096
FILLER = "filler.bin"
#: the bound on the failing fit, process start included (it took 4-7 s on the loaded 2-core machine)
BOUND_S = 60


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root with CAP_SYS_ADMIN")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def files_under(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> SHA-256), the filler excepted."""
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if name != FILLER:
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE)


class FillDisk(Callback):
    """After optimizer step ``at_step`` (after the save before it), rank 0 records every file on the disk,
    then fills the disk up, leaving room for ``leave``, the files of the last save that the next one may
    still write, with a page of slack each: ``"everything"``: nothing; ``"main file"``: the two shards
    but not the main file; ``"rank files"`` (a sharded checkpoint directory): the ranks' own files but not
    DCP's data files. Then both ranks meet."""

    def __init__(self, disk: str, out: str, at_step: int, leave: str) -> None:
        self.disk, self.out, self.at_step, self.leave = disk, out, at_step, leave

    def _room(self, sizes: dict[str, int]) -> int:
        """Bytes to leave free, checking that what must fail would not fit into them."""
        if self.leave == "everything":
            return 0
        if self.leave == "main file":
            kept = [n for n in sizes if n.endswith(".pt")]
            assert _pages(sizes["ckpt.ckpt"]) > 2 * len(kept), "the main file would fit into the slack"
        else:
            kept = [n for n in sizes if n.startswith(os.path.join("ckpt.ckpt", "desloc"))]
            data = [n for n in sizes if n.endswith(".distcp")]
            assert len(kept) == 2 and len(data) == 2
            assert sum(_pages(sizes[n]) for n in data) > len(kept), "DCP's files would fit into the slack"
        return sum(_pages(sizes[n]) + 1 for n in kept) * PAGE

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.at_step:
            return
        if trainer.global_rank == 0:
            disk = Path(self.disk)
            before = files_under(disk)
            sizes = {name: (disk / name).stat().st_size for name in before}
            Path(self.out, "before.json").write_text(json.dumps({"sha256": before, "bytes": sizes}))
            with open(disk / FILLER, "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
                try:
                    while True:
                        f.write(b"\0" * PAGE)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
            room = self._room(sizes)
            if room:
                os.truncate(disk / FILLER, os.path.getsize(disk / FILLER) - room)
        trainer.strategy.barrier("filled")


class RecordingCheckpoint(ModelCheckpoint):
    """Writes down, per rank, the exception its save raised (a callback's ``on_exception`` would run in the
    launcher's process only), then re-raises."""

    def __init__(self, out: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out

    def _save_checkpoint(self, trainer, filepath):
        try:
            super()._save_checkpoint(trainer, filepath)
        except Exception as err:
            torch.save({"type": type(err).__name__, "message": str(err), "errno": getattr(err, "errno", None),
                        "isinstance_oserror": isinstance(err, OSError), "global_step": trainer.global_step},
                       os.path.join(self.out, f"raised{trainer.global_rank}.pt"))
            # the launcher terminates the other workers as soon as one has failed: let each rank write its
            # record first (a rank that never raises leaves its file missing, and the test fails on it)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not all(
                    os.path.exists(os.path.join(self.out, f"raised{r}.pt")) for r in range(trainer.world_size)):
                time.sleep(0.05)
            raise


def trainer(out: Path, disk: Path, callbacks=(), epochs: int = 2) -> L.Trainer:
    checkpoint = RecordingCheckpoint(str(out), dirpath=str(disk), filename="ckpt", save_top_k=1,
                                     every_n_train_steps=3, enable_version_counter=False)
    return L.Trainer(accelerator="cpu", devices=2, max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                     default_root_dir=str(out), strategy=DeslocStrategy(**PERIODS, start_method=START_METHOD),
                     callbacks=[checkpoint, Recorder(str(out / "rec")), *callbacks])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("leave", ["everything", "main file"])
def test_a_full_disk_fails_the_save_on_every_rank_and_keeps_the_previous_checkpoint(small_disk, tmp_path, leave):
    out = tmp_path / "run"
    out.mkdir()
    L.seed_everything(0)
    start = time.monotonic()
    with pytest.raises(Exception, match="No space left on device"):
        trainer(out, small_disk, [FillDisk(str(small_disk), str(out), at_step=4, leave=leave)]).fit(Net(hidden=HIDDEN))
    elapsed = time.monotonic() - start
    print(f"\nMEASURED full disk ({leave}): the failing fit (2 processes started, 6 steps, the failed save) "
          f"ended after {elapsed:.1f} s")
    assert elapsed < BOUND_S

    raised = [torch.load(out / f"raised{r}.pt") for r in range(2)]
    failed_rank = "rank 0 could not write" if leave == "main file" else "rank 1 could not write"
    failed_file = str(small_disk / "ckpt.ckpt") if leave == "main file" else "rank-00001.pt"
    for r, err in enumerate(raised):
        assert err["type"] == "CheckpointWriteError" and err["isinstance_oserror"], (r, err)
        assert err["errno"] == errno.ENOSPC and err["global_step"] == 6, (r, err)
        message = err["message"]
        assert "the disk is full (ENOSPC" in message and failed_rank in message and failed_file in message, message
        assert "previous checkpoint" in message and "unchanged" in message
    if leave == "main file":
        assert "rank 1 could not write" not in raised[0]["message"]

    # the step-3 checkpoint is intact byte for byte, and nothing of the failed save is left
    before = json.loads((out / "before.json").read_text())["sha256"]
    assert {name for name in before if name.endswith(".pt")} and any(n.endswith("manifest.json") for n in before)
    assert files_under(small_disk) == before
    leftovers = [n for n in os.listdir(small_disk) if n not in (FILLER, "ckpt.ckpt", "ckpt.ckpt.shards")]
    assert leftovers == [] and len(os.listdir(small_disk / "ckpt.ckpt.shards")) == 1

    # and it resumes, on the local path, once there is room again
    os.remove(small_disk / FILLER)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    L.seed_everything(0)
    trainer(resumed, small_disk, epochs=1).fit(Net(hidden=HIDDEN), ckpt_path=str(small_disk / "ckpt.ckpt"))
    for r in range(2):
        record = torch.load(resumed / "rec" / f"rank{r}.pt")
        assert record["resume"] == "local" and record["start"]["optimizer_steps"] == [3]
        assert max(record["steps"]) == 5


# --------------------------------------------------------------------------- checkpoints of sharded groups
class LocalShards(Callback):
    """Rank r writes ``<out>/shards<r>.pt``: its local shards after every optimizer step, and the resume
    path the strategy took (``resume_decision.path``)."""

    def __init__(self, out: str) -> None:
        self.out, self.steps = out, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lightning_desloc.sharding import local_tensor

        self.steps[trainer.global_step] = [local_tensor(p).detach().clone() for p in pl_module.parameters()]
        # written as it goes: a fit that fails never reaches on_train_end
        torch.save(self.steps, os.path.join(self.out, f"steps{trainer.global_rank}.pt"))

    def on_train_end(self, trainer, pl_module):
        decision = getattr(trainer.strategy, "resume_decision", None)
        torch.save({"steps": self.steps, "resume": None if decision is None else decision.path},
                   os.path.join(self.out, f"shards{trainer.global_rank}.pt"))


class StepNet(Net):
    """Net whose step s trains on batch s (mod the epoch's batches), whatever the loader yields: a fit
    resumed mid-epoch restarts a plain loader at its first batch, and must still see the failed run's."""

    def train_dataloader(self):
        # the batches without iterating a DataLoader (a new iterator draws its seed from the global RNG: after
        # the restore in the resumed run, before step 1 in the failed one; the dropout masks would differ)
        x, y = super().train_dataloader().dataset.tensors
        self.batches = list(zip(x.split(4), y.split(4)))
        return self.batches

    def training_step(self, batch, batch_idx):
        return super().training_step(self.batches[self.trainer.global_step % len(self.batches)], batch_idx)


def sharded_trainer(out: Path, disk: Path, callbacks=(), epochs: int = 2) -> L.Trainer:
    # 2 groups of 1 rank (FSDP2 over one rank): DES-LOC across the groups, checkpoints as DCP directories
    checkpoint = RecordingCheckpoint(str(out), dirpath=str(disk), filename="ckpt", save_top_k=1,
                                     every_n_train_steps=3, enable_version_counter=False)
    strategy = DeslocStrategy(**PERIODS, group_size=1, shard_within_group=True, start_method=START_METHOD)
    return L.Trainer(accelerator="cpu", devices=2, max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                     default_root_dir=str(out), strategy=strategy, callbacks=[checkpoint, LocalShards(str(out)), *callbacks])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("leave", ["everything", "rank files"])
def test_a_full_disk_fails_a_sharded_save_on_every_rank_and_keeps_the_previous_directory(small_disk, tmp_path, leave):
    """The same for ``shard_within_group=True``, whose checkpoint is a directory (DCP + meta.pt + the ranks'
    own files): every rank raises at step 6, the step-3 directory is unchanged byte for byte, no staging
    directory is left, and the fit resumes from it on the local path, bit for bit as the failed run went."""
    out = tmp_path / "run"
    out.mkdir()
    L.seed_everything(0)
    with pytest.raises(Exception, match="No space left on device"):
        sharded_trainer(out, small_disk, [FillDisk(str(small_disk), str(out), at_step=4, leave=leave)]).fit(
            StepNet(hidden=HIDDEN))
    raised = [torch.load(out / f"raised{r}.pt") for r in range(2)]
    for r, err in enumerate(raised):
        assert err["type"] == "CheckpointWriteError" and err["isinstance_oserror"], (r, err)
        assert err["errno"] == errno.ENOSPC and err["global_step"] == 6, (r, err)
        message = err["message"]
        assert "the disk is full (ENOSPC" in message and "previous checkpoint" in message, message
        if leave == "rank files":  # the own files were written; what failed is DCP's data
            assert "could not write DCP's files in " in message and ".ckpt.ckpt.tmp-" in message, message
            assert "rank0.pt" not in message and "rank1.pt" not in message, message
        else:
            assert "rank0.pt: the disk is full" in message and "rank1.pt: the disk is full" in message, message

    before = json.loads((out / "before.json").read_text())["sha256"]
    assert any(n.endswith(".metadata") for n in before) and any(n.endswith("meta.pt") for n in before)
    assert files_under(small_disk) == before
    assert sorted(os.listdir(small_disk)) == sorted([FILLER, "ckpt.ckpt"])  # no staging directory left

    os.remove(small_disk / FILLER)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    L.seed_everything(0)
    sharded_trainer(resumed, small_disk).fit(StepNet(hidden=HIDDEN), ckpt_path=str(small_disk / "ckpt.ckpt"))
    for r in range(2):
        got = torch.load(resumed / f"shards{r}.pt")
        assert got["resume"] == "local" and min(got["steps"]) == 4
        # the failed run went on to step 6 (its save failed after the step): steps 4 to 6 again, bit for bit
        failed = torch.load(out / f"steps{r}.pt")
        assert sorted(failed) == [1, 2, 3, 4, 5, 6]
        for step in (4, 5, 6):
            assert all(torch.equal(a, b) for a, b in zip(got["steps"][step], failed[step])), (r, step)
