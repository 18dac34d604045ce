"""``ddp_warmup_steps``: a checkpoint saved inside the DDP warm-up resumes inside it, bit for bit.

Every-step agreement with the reference simulator (warm-up, then the schedule counted from its end) is
in test_core.py (threads) and test_equivalence.py (real Trainer fits); this file checks the resume.
"""

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_desloc import DeslocStrategy
from helpers import N_PARAMS, START_METHOD, Regression, quiet_trainer


class EndRecorder(Regression):
    def on_fit_end(self):  # after the strategy's end-of-fit consensus
        torch.save({"params": [p.detach().clone() for p in self.parameters()],
                    "steps": list(self.trainer.strategy.optimizer_steps)},
                   f"{self.out_dir}/end{self.global_rank}.pt")


def _fit(out_dir, ckpt_dir=None, ckpt_path=None):
    # 3 batches per epoch, checkpoints at epoch ends (steps 3, 6, 9): a resume starts at a fresh epoch
    model = EndRecorder(n_batches=3, out_dir=str(out_dir))
    strategy = DeslocStrategy(param_sync_every=2, state_sync_every=4, ddp_warmup_steps=5, start_method=START_METHOD)
    callbacks = [ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_epochs=1)] if ckpt_dir else []
    trainer = quiet_trainer(strategy=strategy, max_epochs=4, limit_val_batches=0, callbacks=callbacks,
                            enable_checkpointing=bool(ckpt_dir))
    trainer.fit(model, ckpt_path=ckpt_path)
    return strategy, [torch.load(out_dir / f"end{r}.pt") for r in range(2)]


def test_a_checkpoint_inside_the_warmup_resumes_inside_it(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole, ends = _fit(tmp_path / "a", ckpt_dir=tmp_path / "ckpt")
    # warm-up steps 1-5 (gradients), then s' = s - 5 = 1..7: params at s' = 2, 4, 6 and the closing average
    model_bytes = N_PARAMS * 4
    assert whole.ledger.bytes["grads"] == 5 * model_bytes
    assert whole.ledger.bytes["params"] == (3 + 1) * model_bytes
    assert whole.ledger.bytes["state/exp_avg"] == whole.ledger.bytes["state/exp_avg_sq"] == model_bytes  # s' = 4

    inside = sorted((tmp_path / "ckpt").glob("*step=3.ckpt"))
    assert len(inside) == 1, sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, again = _fit(tmp_path / "b", ckpt_path=str(inside[0]))
    assert resumed.resume_decision is None or resumed.resume_decision.path == "local"
    for r in range(2):
        assert again[r]["steps"] == ends[r]["steps"] == [12]
        for a, b in zip(again[r]["params"], ends[r]["params"]):
            assert torch.equal(a, b)
    # the resumed run sent the rest of the warm-up (steps 4, 5) and the same schedule after it
    assert resumed.ledger.bytes["grads"] == 5 * model_bytes
    assert resumed.ledger.bytes["params"] == whole.ledger.bytes["params"]
