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
        strategy=DeslocStrategy(**OPTIONS, start_method="spawn"),
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
