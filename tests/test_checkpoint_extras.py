"""What the strategy keeps beside the optimizers survives a checkpoint: the outer optimizer's global
parameters and momentum (issue 7: "the outer momentum is part of checkpoints") and the int8 delta
anchor and error feedback of compressed averaging.

The expectation is the uninterrupted run itself: a run resumed on the same 2 ranks from its epoch-0
checkpoint must continue bit for bit. Were the outer optimizer primed afresh at resume (momentum
lost, anchor at the initial weights) or the compression memory dropped, the trajectories would part.
"""

import glob
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckpt_models import Net, Recorder
from lightning_desloc import DeslocStrategy
from helpers import START_METHOD

OPTIONS = dict(
    param_sync_every=3,
    state_sync_every={"exp_avg": 6, "exp_avg_sq": 12},
    outer_lr=0.7,
    outer_momentum=0.9,
    compression={"params": "int8", "states": "bf16"},
)


def fit(out, ckpt_path=None, epochs=3, devices=2):
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        default_root_dir=str(out),
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        strategy=DeslocStrategy(**OPTIONS, start_method=START_METHOD),
        callbacks=[
            Recorder(os.path.join(str(out), "rec")),
            ModelCheckpoint(dirpath=os.path.join(str(out), "ck"), save_top_k=-1, every_n_epochs=1),
        ],
    )
    trainer.fit(Net(), ckpt_path=ckpt_path)
    return {int(os.path.basename(f)[4:-3]): torch.load(f) for f in glob.glob(os.path.join(str(out), "rec", "rank*.pt"))}


def test_outer_momentum_and_compression_memory_survive_a_same_size_resume(tmp_path):
    ref = fit(tmp_path / "ref")
    path = os.path.join(tmp_path, "ref", "ck", "epoch=0-step=5.ckpt")
    meta = torch.load(path, weights_only=True)["desloc"]
    # after step 3's average the outer optimizer has a momentum buffer; it is in the main file
    assert meta["core"]["options"]["outer"]["momentum_buffer"].abs().sum() > 0
    got = fit(tmp_path / "resumed", ckpt_path=path)
    for r in (0, 1):
        assert got[r]["resume"] == "local"
        for step in range(6, 16):
            assert torch.equal(got[r]["steps"][step], ref[r]["steps"][step]), (r, step)


def test_last_ckpt_saved_before_the_final_consensus_is_the_model_fit_returns(tmp_path):
    """``ModelCheckpoint(save_last=True)`` saves at the end of the last epoch, before ``on_train_end``'s
    final consensus; with ``outer_lr`` that consensus is the outer step applied to the mean, and the main
    file holds the same. Step 5 lies between parameter averages (3, 6), so the ranks differ there."""
    L.seed_everything(0)
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, default_root_dir=str(tmp_path), max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        num_sanity_val_steps=0,
        strategy=DeslocStrategy(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12},
                                outer_lr=0.7, outer_momentum=0.9, start_method=START_METHOD),
        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)],
    )
    trainer.fit(model)  # the spawn launcher loads rank 0's final weights into `model`
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    # bitwise: the save and the final consensus compute the same float64 sums of the same 2 values (a + b
    # is a + b in either order), divide by 2 and take the outer step with the same element-wise operations
    for name, value in model.state_dict().items():
        assert torch.equal(last["state_dict"][name], value), name

    # independently: the outer Nesterov step (torch's SGD equations) from the mean of the shards and the
    # global parameters and momentum of the last average (step 3), recorded in the main file
    meta = last["desloc"]
    directory = os.path.join(str(tmp_path / "ck" / "last.ckpt") + ".shards", meta["save_id"])
    shards = [torch.load(f, weights_only=True) for f in sorted(glob.glob(os.path.join(directory, "rank-*.pt")))]
    names = [n for n, _ in Net().named_parameters()]
    mean = torch.cat([sum(s["state_dict"][n] for s in shards).reshape(-1) / 2 for n in names])
    x_old = meta["core"]["snapshot"]["flat"]
    b_old = meta["core"]["options"]["outer"]["momentum_buffer"]
    g = x_old - mean
    b = 0.9 * b_old + g
    x_new = x_old - 0.7 * (g + 0.9 * b)
    got = torch.cat([last["state_dict"][n].reshape(-1) for n in names])
    # to 1e-12 relative, not bitwise: this formula rounds 0.9 * b and 0.7 * (...) separately where
    # torch's add(alpha=...) fuses the multiply and the add
    torch.testing.assert_close(got, x_new, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(got, mean)  # the outer step moved it: the plain mean would not do
    # what a consensus resume continues from: the outer optimizer's state after that step
    after = meta["consensus_core"]
    assert torch.equal(after["snapshot"]["flat"], got)  # float64 parameters: the snapshot is them exactly
    torch.testing.assert_close(after["options"]["outer"]["momentum_buffer"], b, rtol=1e-12, atol=1e-15)
    assert torch.equal(meta["core"]["snapshot"]["flat"], x_old)  # the live state, for the local path
