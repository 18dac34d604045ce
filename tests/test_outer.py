"""The outer Nesterov step on the parameter average, against the SGD equations written out here."""

import torch

from lightning_desloc import DeslocStrategy
from lightning_desloc.outer import OuterOptimizer
from helpers import START_METHOD, Regression, quiet_trainer


def test_outer_lr_one_without_momentum_is_plain_averaging():
    w = torch.tensor([2.0, -1.0])
    outer = OuterOptimizer(lr=1.0, momentum=0.0)
    outer.prime([w])
    for target in ([1.0, 0.0], [0.5, 0.5]):
        w.copy_(torch.tensor(target))
        outer.step([w])
        assert w.tolist() == target


class LocalAndSynced(Regression):
    """Saves each rank's local parameters right after every optimizer step (before any average) and
    the parameters after the strategy's sync."""

    def on_fit_start(self):  # after the strategy's setup broadcast
        self.local = {}
        torch.save([p.detach().clone() for p in self.parameters()], f"{self.out_dir}/initial{self.global_rank}.pt")

        def after_step(optimizer, args, kwargs):
            self.local[self.global_step + 1] = [p.detach().clone() for p in self.parameters()]

        self.optimizers().optimizer.register_step_post_hook(after_step)

    def training_step(self, batch, batch_idx):
        return super().training_step([t.double() for t in batch], batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        synced = [p.detach().clone() for p in self.parameters()]
        torch.save({"local": self.local[self.global_step], "synced": synced},
                   f"{self.out_dir}/r{self.global_rank}_{self.global_step}.pt")


def test_outer_nesterov_step_in_a_real_run(tmp_path):
    lr, mu, k_x, steps = 0.7, 0.9, 3, 9
    model = LocalAndSynced(n_batches=steps, out_dir=str(tmp_path))
    model.double()
    strategy = DeslocStrategy(param_sync_every=k_x, outer_lr=lr, outer_momentum=mu, start_method=START_METHOD)
    quiet_trainer(strategy=strategy, max_steps=steps, limit_val_batches=0).fit(model)

    load = lambda r, s: torch.load(tmp_path / f"r{r}_{s}.pt")  # noqa: E731
    anchor = torch.load(tmp_path / "initial0.pt")  # the global parameters start as the broadcast weights
    assert all(torch.equal(a, b) for a, b in zip(anchor, torch.load(tmp_path / "initial1.pt")))
    buf = None
    for s in range(1, steps + 1):
        r0, r1 = load(0, s), load(1, s)
        if s % k_x:
            for a, b in zip(r0["synced"], r1["synced"]):
                assert not torch.equal(a, b)  # local phase: ranks differ
            continue
        average = [(a + b) / 2 for a, b in zip(r0["local"], r1["local"])]
        grad = [g - m for g, m in zip(anchor, average)]
        buf = [g.clone() for g in grad] if buf is None else [mu * b + g for b, g in zip(buf, grad)]
        anchor = [a - lr * (g + mu * b) for a, g, b in zip(anchor, grad, buf)]
        for got in (r0["synced"], r1["synced"]):
            for x, y in zip(got, anchor):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
