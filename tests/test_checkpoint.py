"""DES-LOC checkpoints on real gloo processes: the consensus main file against the mean of the shards,
ModelCheckpoint housekeeping, same-size resume against an uninterrupted run, resume on 3 and 1 ranks,
corrupt / missing / foreign shards, and a crash in the middle of a save.

One reference run (2 ranks, 3 epochs of 5 steps, float64, Adam, K_x=3, exp_avg every 6 and exp_avg_sq
every 12 steps, checkpoints after every epoch) is shared by the tests; the others resume from its
epoch-0 checkpoint (optimizer step 5: between syncs, so the ranks' states differ).
"""

import glob
import hashlib
import json
import os
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckpt_models import CrashDuringSave, Net, Recorder, flat_params
from helpers import START_METHOD
from lightning_desloc import DeslocStrategy
from lightning_desloc import checkpoint as ckpt

PERIODS = dict(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12})
N_PARAMS = sum(p.numel() for p in Net().parameters())


def make_trainer(out, epochs=3, devices=2, callbacks=(), allow_consensus_fallback=False, checkpoints=True):
    cbs = [Recorder(os.path.join(out, "rec")), *callbacks]
    if checkpoints:
        cbs += [
            ModelCheckpoint(dirpath=os.path.join(out, "all"), save_top_k=-1, every_n_epochs=1, save_last="link"),
            ModelCheckpoint(dirpath=os.path.join(out, "top1"), save_top_k=1, every_n_train_steps=5, save_weights_only=True),
        ]
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        default_root_dir=out,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        strategy=DeslocStrategy(**PERIODS, start_method=START_METHOD, allow_consensus_fallback=allow_consensus_fallback),
        callbacks=cbs,
    )


def fit(out, ckpt_path=None, model=None, **kwargs):
    L.seed_everything(0)
    make_trainer(str(out), **kwargs).fit(model or Net(), ckpt_path=ckpt_path)
    return {int(os.path.basename(f)[4:-3]): torch.load(f) for f in glob.glob(os.path.join(str(out), "rec", "rank*.pt"))}


def messages(out, capfd):
    """What the ranks wrote to stderr: the workers' files (see ``Recorder.setup``) and, for a fit in this
    process (devices=1), the captured stderr."""
    files = sorted(glob.glob(os.path.join(str(out), "rec", "rank*.err")))
    return capfd.readouterr().err + "".join(open(f).read() for f in files)


def shards_of(main_path):
    """The shard files of a main file, read independently of the package: manifest -> torch.load."""
    meta = torch.load(main_path, weights_only=True)["desloc"]
    directory = os.path.join(os.path.realpath(main_path) + ".shards", meta["save_id"])
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    return directory, manifest, [torch.load(os.path.join(directory, e["file"]), weights_only=True) for e in manifest["shards"]]


def flat(state_dict):
    return torch.cat([state_dict[k].reshape(-1) for k in ("net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias")])


def flat_opt(opt_state, key):
    return torch.cat([opt_state["state"][i][key].reshape(-1) for i in sorted(opt_state["state"])])


def mean_of_shards(main_path):
    _, _, shards = shards_of(main_path)
    n = len(shards)
    return {
        "params": sum(flat(s["state_dict"]) for s in shards) / n,
        "exp_avg": sum(flat_opt(s["optimizer_states"][0], "exp_avg") for s in shards) / n,
        "exp_avg_sq": sum(flat_opt(s["optimizer_states"][0], "exp_avg_sq") for s in shards) / n,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, fit(out)


@pytest.fixture
def epoch0(reference, tmp_path):
    """A private copy of the reference run's epoch-0 checkpoint (main file + shards)."""
    src = os.path.join(reference[0], "all", "epoch=0-step=5.ckpt")
    dst = os.path.join(tmp_path, "epoch0.ckpt")
    shutil.copy2(src, dst)
    shutil.copytree(src + ".shards", dst + ".shards")
    return dst


# ----------------------------------------------------------------------------------------- saving
def test_main_file_is_the_consensus_of_the_shards_and_plain_lightning_loads_it(reference):
    out, rec = reference
    path = os.path.join(out, "all", "epoch=0-step=5.ckpt")
    main = torch.load(path, weights_only=True)
    directory, manifest, shards = shards_of(path)
    assert manifest["world_size"] == 2 and manifest["global_step"] == 5 and main["desloc"]["optimizer_steps"] == [5]
    for entry in manifest["shards"]:
        data = open(os.path.join(directory, entry["file"]), "rb").read()
        assert len(data) == entry["bytes"] and ckpt._sha256(data) == entry["sha256"]
    # step 5 is between syncs: the ranks differ, and the main file holds their exact mean
    a, b = (flat(s["state_dict"]) for s in shards)
    assert not torch.equal(a, b)
    assert torch.equal(flat(main["state_dict"]), (a + b) / 2)
    for key in ("exp_avg", "exp_avg_sq"):
        sa, sb = (flat_opt(s["optimizer_states"][0], key) for s in shards)
        assert not torch.equal(sa, sb)
        assert torch.equal(flat_opt(main["optimizer_states"][0], key), (sa + sb) / 2)
    assert main["optimizer_states"][0]["state"][0]["step"] == shards[0]["optimizer_states"][0]["state"][0]["step"]
    # each shard holds that rank's own local state as recorded during the run
    for r, shard in enumerate(shards):
        assert torch.equal(flat(shard["state_dict"]), rec[r]["steps"][5])
    # plain Lightning, without the strategy, loads the consensus
    model = Net.load_from_checkpoint(path)
    assert torch.equal(flat_params(model), (a + b) / 2)
    # the consensus reductions are in the ledger as their own category, float64, and a save sends only
    # what differs between ranks: at steps 5 and 10 (between all averages) a full save sends the
    # parameters, exp_avg and exp_avg_sq, a weights-only save the parameters; at step 15 (K_x = 3 averaged
    # the parameters right before, not exp_avg (every 6) nor exp_avg_sq (every 12)) the full save sends the
    # two states and the weights-only save nothing
    assert rec[0]["ledger"]["checkpoint"] == ((3 + 1) + (3 + 1) + (2 + 0)) * N_PARAMS * 8


def test_model_checkpoint_keeps_main_files_and_shards_together(reference):
    out, _ = reference
    names = sorted(os.listdir(os.path.join(out, "all")))
    mains = [f"epoch={e}-step={5 * (e + 1)}.ckpt" for e in range(3)]
    assert names == sorted(mains + [m + ".shards" for m in mains] + ["last.ckpt"])
    assert os.readlink(os.path.join(out, "all", "last.ckpt")) == mains[-1]
    _, manifest, _ = shards_of(os.path.join(out, "all", "last.ckpt"))  # the link finds its target's shards
    assert manifest["global_step"] == 15
    for m in mains:
        assert len(os.listdir(os.path.join(out, "all", m + ".shards"))) == 1  # old save directories are gone
    # save_top_k=1 removed the older files and their shards; save_weights_only keeps both sides weights-only
    assert sorted(os.listdir(os.path.join(out, "top1"))) == ["epoch=2-step=15.ckpt", "epoch=2-step=15.ckpt.shards"]
    path = os.path.join(out, "top1", "epoch=2-step=15.ckpt")
    main = torch.load(path, weights_only=True)
    _, _, shards = shards_of(path)
    assert "optimizer_states" not in main and all(s["optimizer_states"] is None for s in shards)
    assert torch.equal(flat(main["state_dict"]), sum(flat(s["state_dict"]) for s in shards) / 2)


# ----------------------------------------------------------------------------------------- resuming
def test_same_size_resume_continues_the_uninterrupted_run_bit_for_bit(reference, tmp_path, capfd):
    out, ref = reference
    got = fit(tmp_path / "resumed", ckpt_path=os.path.join(out, "all", "epoch=0-step=5.ckpt"))
    assert "LOCAL path" in messages(tmp_path / "resumed", capfd)
    for r in (0, 1):
        assert got[r]["resume"] == "local"
        assert got[r]["start"]["optimizer_steps"] == [5]
        assert sorted(got[r]["steps"]) == list(range(6, 16))
        for step in range(6, 16):
            assert torch.equal(got[r]["steps"][step], ref[r]["steps"][step]), (r, step)
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[r]["end"][key], ref[r]["end"][key])
    # the continued run's checkpoints equal the uninterrupted run's
    for name in ("epoch=2-step=15.ckpt",):
        a = torch.load(os.path.join(out, "all", name), weights_only=True)
        b = torch.load(tmp_path / "resumed" / "all" / name, weights_only=True)
        assert torch.equal(flat(a["state_dict"]), flat(b["state_dict"]))
        assert torch.equal(flat_opt(a["optimizer_states"][0], "exp_avg_sq"), flat_opt(b["optimizer_states"][0], "exp_avg_sq"))


@pytest.mark.parametrize("devices", [3, 1])
def test_resume_on_another_world_size_starts_every_rank_from_the_mean_of_the_shards(epoch0, tmp_path, devices, capfd):
    expected = mean_of_shards(epoch0)
    got = fit(tmp_path / "run", ckpt_path=epoch0, devices=devices, epochs=2, checkpoints=False)
    assert "CONSENSUS path (rank 0: saved with 2 ranks, resuming with" in messages(tmp_path / "run", capfd)
    assert sorted(got) == list(range(devices))
    for r in range(devices):
        assert got[r]["resume"] == "consensus"
        assert got[r]["start"]["optimizer_steps"] == [5]
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[r]["start"][key], expected[key]), (r, key)
        assert sorted(got[r]["steps"]) == list(range(6, 11))  # the schedule continues at step 6


def test_corrupt_shard_is_an_error_unless_the_fallback_is_allowed(epoch0, tmp_path, capfd):
    directory, manifest, _ = shards_of(epoch0)
    victim = os.path.join(directory, manifest["shards"][1]["file"])
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(Exception, match=r"rank 1: shard .* is corrupt \(SHA-256"):
        fit(tmp_path / "strict", ckpt_path=epoch0, epochs=1, checkpoints=False)
    got = fit(tmp_path / "lenient", ckpt_path=epoch0, epochs=2, checkpoints=False, allow_consensus_fallback=True)
    err = messages(tmp_path / "lenient", capfd)
    assert "allow_consensus_fallback=True, so every rank starts from the consensus" in err
    main = torch.load(epoch0, weights_only=True)
    for r in (0, 1):  # both ranks agree on the consensus path, although rank 0's own shard is fine
        assert got[r]["resume"] == "consensus"
        assert torch.equal(got[r]["start"]["params"], flat(main["state_dict"]))
        assert torch.equal(got[r]["start"]["exp_avg"], flat_opt(main["optimizer_states"][0], "exp_avg"))


def test_truncated_and_foreign_shards_are_detected(reference, epoch0):
    # the per-rank verdict that the ranks then agree on (the agreement itself: the corrupt-shard test)
    meta = torch.load(epoch0, weights_only=True)["desloc"]
    directory, manifest, _ = shards_of(epoch0)
    assert ckpt._check_own_shard(meta, epoch0, world=2, rank=0)[0] == ckpt.OK
    assert ckpt._check_own_shard(meta, epoch0, world=3, rank=0)[0] == ckpt.RESIZED
    victim = os.path.join(directory, manifest["shards"][0]["file"])
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 3])
    status, reason, _ = ckpt._check_own_shard(meta, epoch0, world=2, rank=0)
    assert status == ckpt.BAD and "truncated" in reason
    # the epoch-1 save's (self-consistent) shard directory where epoch 0's should be
    other, _, _ = shards_of(os.path.join(reference[0], "all", "epoch=1-step=10.ckpt"))
    shutil.rmtree(directory)
    shutil.copytree(other, directory)
    status, reason, _ = ckpt._check_own_shard(meta, epoch0, world=2, rank=1)
    assert status == ckpt.BAD and "belongs to another checkpoint or model" in reason
    # a shard file swapped in from another save, with the manifest edited to match its checksum
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    manifest["save_id"] = meta["save_id"]
    open(os.path.join(directory, "manifest.json"), "w").write(json.dumps(manifest))
    status, reason, _ = ckpt._check_own_shard(meta, epoch0, world=2, rank=1)
    assert status == ckpt.BAD and "is foreign" in reason


def test_a_damaged_manifest_entry_is_a_verdict_every_rank_shares(epoch0, tmp_path):
    # rank 1's manifest entry loses its size: rank 1 alone would raise KeyError while rank 0 waits
    directory, manifest, _ = shards_of(epoch0)
    meta = torch.load(epoch0, weights_only=True)["desloc"]
    del manifest["shards"][1]["bytes"]
    open(os.path.join(directory, "manifest.json"), "w").write(json.dumps(manifest))
    status, reason, _ = ckpt._check_own_shard(meta, epoch0, world=2, rank=1)
    assert status == ckpt.BAD and "KeyError" in reason and "rank 1" in reason
    assert ckpt._check_own_shard(meta, epoch0, world=2, rank=0)[0] == ckpt.OK
    got = fit(tmp_path / "run", ckpt_path=epoch0, epochs=2, checkpoints=False, allow_consensus_fallback=True)
    assert got[0]["resume"] == got[1]["resume"] == "consensus"


def test_a_longer_shard_is_not_called_truncated(epoch0):
    meta = torch.load(epoch0, weights_only=True)["desloc"]
    directory, manifest, _ = shards_of(epoch0)
    with open(os.path.join(directory, manifest["shards"][0]["file"]), "ab") as f:
        f.write(b"x" * 64)
    status, reason, _ = ckpt._check_own_shard(meta, epoch0, world=2, rank=0)
    assert status == ckpt.BAD and "truncated" not in reason
    assert f"its manifest says {manifest['shards'][0]['bytes']}" in reason


def test_the_main_file_is_checked_against_its_manifest(epoch0, tmp_path):
    _, manifest, _ = shards_of(epoch0)
    data = open(epoch0, "rb").read()
    assert manifest["main"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert ckpt.main_file_problem(epoch0) is None
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit, somewhere in the tensors
    open(epoch0, "wb").write(bytes(flipped))
    with pytest.raises(Exception, match=r"epoch0.ckpt is corrupt: its SHA-256 does not match"):
        fit(tmp_path / "flipped", ckpt_path=epoch0, epochs=1, checkpoints=False, allow_consensus_fallback=True)
    open(epoch0, "wb").write(data[: len(data) - 100])
    problem = ckpt.main_file_problem(epoch0)
    assert problem is not None and f"it has {len(data) - 100} bytes" in problem and str(len(data)) in problem


def test_a_shard_passed_as_the_checkpoint_is_named_as_such(epoch0):
    directory, manifest, _ = shards_of(epoch0)
    shard = os.path.join(directory, manifest["shards"][1]["file"])
    main, problem = ckpt.read_main(shard, lambda p: torch.load(p, weights_only=True))
    assert main is None and "rank 1's shard of a DES-LOC checkpoint" in problem
    main, problem = ckpt.read_main(epoch0, lambda p: torch.load(p, weights_only=True))
    assert problem is None and main["global_step"] == 5


def test_missing_shard_falls_back_to_the_consensus_with_a_warning(epoch0, tmp_path, capfd):
    expected = mean_of_shards(epoch0)
    directory, manifest, _ = shards_of(epoch0)
    os.remove(os.path.join(directory, manifest["shards"][1]["file"]))
    got = fit(tmp_path / "run", ckpt_path=epoch0, epochs=2, checkpoints=False)
    assert "shards missing (rank 1: shard" in messages(tmp_path / "run", capfd)
    for r in (0, 1):
        assert got[r]["resume"] == "consensus"
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[r]["start"][key], expected[key])


def test_checkpoint_of_a_different_model_is_an_error(epoch0, tmp_path):
    with pytest.raises(Exception, match="saved from a different model"):
        fit(tmp_path / "run", ckpt_path=epoch0, model=Net(hidden=8), epochs=1, checkpoints=False)


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    out = str(tmp_path)
    # last.ckpt is overwritten after every epoch; rank 0 dies halfway through writing the second one
    overwrite = ModelCheckpoint(
        dirpath=os.path.join(out, "ck"), filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
    )
    callbacks = [overwrite, CrashDuringSave(nth=2)]
    with pytest.raises(Exception, match="exit code 17"):
        fit(out, epochs=3, callbacks=callbacks, checkpoints=False)
    last = os.path.join(out, "ck", "last.ckpt")
    main = torch.load(last, weights_only=True)
    assert main["global_step"] == 5
    assert glob.glob(os.path.join(out, "ck", ".last.ckpt.tmp-*")), "the crash should have left a half-written temp file"
    directory, manifest, shards = shards_of(last)  # the shards the old main file names are intact
    for rank, entry in enumerate(manifest["shards"]):
        status, reason, _ = ckpt._check_own_shard(main["desloc"], last, world=2, rank=rank)
        assert status == ckpt.OK, reason
    assert torch.equal(flat(main["state_dict"]), sum(flat(s["state_dict"]) for s in shards) / 2)
    assert Net.load_from_checkpoint(last) is not None
