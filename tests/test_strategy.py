"""DeslocStrategy on real 2-process gloo fits: bytes against the schedule, validation, AMP skips,
baseline policies, registration, LightningCLI and the errors."""

import math

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

import lightning_desloc
from lightning_desloc import DeslocStrategy
from helpers import HIDDEN, IN, N_PARAMS, OUT, START_METHOD, Regression, quiet_trainer  # noqa: F401

# --------------------------------------------------------------------------- bytes over 1536 steps
class CountingRegression(Regression):
    """Counts every byte handed to torch.distributed in this process, from setup on."""

    def setup(self, stage):
        self.sent = {"all_reduce": 0, "broadcast": 0}
        for name in self.sent:
            real = getattr(dist, name)

            def counting(tensor, *args, _real=real, _name=name, **kwargs):
                self.sent[_name] += tensor.numel() * tensor.element_size()
                return _real(tensor, *args, **kwargs)

            setattr(dist, name, counting)

    def on_train_end(self):
        torch.save(self.sent, f"{self.out_dir}/sent{self.global_rank}.pt")


def test_bytes_over_1536_adam_steps_equal_the_schedule(tmp_path):
    steps, k_x = 1536, 256
    model = CountingRegression(n_batches=steps, out_dir=str(tmp_path))
    strategy = DeslocStrategy(param_sync_every=k_x, start_method=START_METHOD)  # paper defaults: K_u=768, K_v=1536
    quiet_trainer(strategy=strategy, max_steps=steps, limit_val_batches=0).fit(model)

    model_bytes = N_PARAMS * 4
    expected = {"params": 6 * model_bytes, "state/exp_avg": 2 * model_bytes, "state/exp_avg_sq": 1 * model_bytes}
    ledger = strategy.ledger
    assert {k: ledger.bytes[k] for k in expected} == expected
    assert strategy.optimizer_steps == [steps]
    schedule_bytes = sum(expected.values())  # = 1.5 / K_x model sizes per step
    assert schedule_bytes == pytest.approx(steps * model_bytes * 1.5 / k_x)
    for rank in range(2):
        sent = torch.load(tmp_path / f"sent{rank}.pt")
        # everything all-reduced is the schedule plus control traffic under 0.1% of it
        assert schedule_bytes <= sent["all_reduce"] <= schedule_bytes * 1.001
        ddp_bytes = steps * model_bytes
        assert ddp_bytes / sent["all_reduce"] >= 170
    assert ledger.ddp_equivalent_bytes == steps * model_bytes
    assert ledger.ratio_vs_ddp >= 170
    assert ledger.bytes["setup"] == model_bytes  # rank 0's weights, once


# --------------------------------------------------------------------------- AMP-skipped steps
def test_steps_the_amp_scaler_skips_still_count(tmp_path):
    # Lightning's global_step counts them too; a rank whose scaler skipped must stay on the schedule
    model = Regression(n_batches=12, inf_batches=(2, 5))
    strategy = DeslocStrategy(param_sync_every=2, state_sync_every=5, start_method=START_METHOD)
    # Trainer(precision="16-mixed") turns into bf16 without a scaler on CPU: ask for the fp16 scaler explicitly
    amp = MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_val_batches=0, plugins=[amp])
    trainer.fit(model)
    assert strategy.optimizer_steps == [12]  # 2 of the 12 updates skipped, as global_step counts
    model_bytes = N_PARAMS * 4
    assert strategy.ledger.bytes["params"] == (12 // 2) * model_bytes
    assert strategy.ledger.bytes["state/exp_avg"] == (12 // 5) * model_bytes


# --------------------------------------------------------------------------- validation
class ValidationProbe(Regression):
    """Saves the parameters it is validated with and the local ones just before validation."""

    def on_validation_start(self):
        self.local_before = [p.detach().clone() for p in self.parameters()]

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            evaluated = [p.detach().clone() for p in self.parameters()]
            torch.save({"local": self.local_before, "evaluated": evaluated},
                       f"{self.out_dir}/val{self.global_rank}_{self.global_step}.pt")
        return super().validation_step(batch, batch_idx)

    def on_train_batch_start(self, batch, batch_idx):
        if getattr(self, "local_before", None) is not None and self.global_step > 0:
            for p, q in zip(self.parameters(), self.local_before):
                assert torch.equal(p, q), "local parameters must come back after validation"
            self.local_before = None


@pytest.mark.parametrize("validate_on", ["consensus", "local"])
def test_validation_evaluates_the_documented_model(tmp_path, validate_on):
    model = ValidationProbe(n_batches=9, out_dir=str(tmp_path))
    strategy = DeslocStrategy(param_sync_every=4, validate_on=validate_on, start_method=START_METHOD)
    trainer = quiet_trainer(strategy=strategy, max_steps=9, val_check_interval=3, limit_val_batches=1,
                            num_sanity_val_steps=0)
    trainer.fit(model)
    for step in (3, 6, 9):
        ranks = [torch.load(tmp_path / f"val{r}_{step}.pt") for r in range(2)]
        for i in range(len(ranks[0]["local"])):
            mean = (ranks[0]["local"][i] + ranks[1]["local"][i]) / 2
            for r in range(2):
                expected = mean if validate_on == "consensus" else ranks[r]["local"][i]
                torch.testing.assert_close(ranks[r]["evaluated"][i], expected)
    # step 3: not in sync, step 6 and 9: not in sync either (K_x=4) -> three eval rounds in consensus mode
    expected_eval = 3 * N_PARAMS * 4 if validate_on == "consensus" else 0
    assert strategy.ledger.bytes.get("eval", 0) == expected_eval


class FrozenFirstLayer(ValidationProbe):
    """The first layer frozen from the start (a frozen backbone), still handed to Adam with the rest."""

    def setup(self, stage):
        self.net[0].requires_grad_(False)
        # before the strategy's setup broadcast: rank 1's frozen layer differs until rank 0's arrives
        with torch.no_grad():
            self.net[0].weight.add_(float(self.trainer.global_rank))

    def on_fit_end(self):  # after the strategy's end-of-fit consensus (its on_train_end runs after ours)
        torch.save([p.detach().clone() for p in self.parameters()], f"{self.out_dir}/end{self.global_rank}.pt")


def test_frozen_parameters_are_never_sent(tmp_path):
    model = FrozenFirstLayer(n_batches=9, out_dir=str(tmp_path))
    initial = [p.detach().clone() for p in model.net[0].parameters()]  # rank 0's: what the broadcast sends
    strategy = DeslocStrategy(param_sync_every=4, start_method=START_METHOD)
    trainer = quiet_trainer(strategy=strategy, max_steps=9, val_check_interval=3, limit_val_batches=1,
                            num_sanity_val_steps=0)
    trainer.fit(model)
    frozen_numel = IN * HIDDEN + HIDDEN
    trainable_bytes = (N_PARAMS - frozen_numel) * 4
    # parameter rounds after steps 4 and 8, consensus validation at steps 3, 6, 9 and none at the end
    # (the last validation's consensus is undone, so fit ends with one more average): trainable bytes only
    assert strategy.ledger.bytes["params"] == 2 * trainable_bytes + trainable_bytes
    assert strategy.ledger.bytes["eval"] == 3 * trainable_bytes
    assert strategy.ledger.bytes["setup"] == N_PARAMS * 4  # the broadcast still sends everything, once
    assert strategy.ledger.ddp_equivalent_bytes == 9 * trainable_bytes
    ends = [torch.load(tmp_path / f"end{r}.pt") for r in range(2)]
    for r in range(2):
        for got, want in zip(ends[r][:2], initial):
            assert torch.equal(got, want)  # rank 0's values on every rank, untouched
        for a, b in zip(ends[0][2:], ends[1][2:]):
            assert torch.equal(a, b)  # the trainable part ends as the consensus
    for step in (3, 6, 9):  # validation evaluated the mean of the trainable part
        ranks = [torch.load(tmp_path / f"val{r}_{step}.pt") for r in range(2)]
        for i in (2, 3):
            mean = (ranks[0]["local"][i] + ranks[1]["local"][i]) / 2
            torch.testing.assert_close(ranks[0]["evaluated"][i], mean)


# --------------------------------------------------------------------------- baseline policies
class PolicyProbe(Regression):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        opt = self.optimizers().optimizer
        state = [{k: v.clone() for k, v in opt.state[p].items()} for p in self.parameters()]
        torch.save(state, f"{self.out_dir}/state{self.global_rank}_{self.global_step}.pt")


@pytest.mark.parametrize("policy", ["keep_local", "reset"])
def test_baseline_state_policies(tmp_path, policy):
    model = PolicyProbe(n_batches=6, out_dir=str(tmp_path))
    strategy = DeslocStrategy(param_sync_every=3, state_policy=policy, start_method=START_METHOD)
    quiet_trainer(strategy=strategy, max_steps=6, limit_val_batches=0).fit(model)
    assert not any(k.startswith("state/") for k in strategy.ledger.bytes)
    for step in range(1, 7):
        ranks = [torch.load(tmp_path / f"state{r}_{step}.pt") for r in range(2)]
        for p0, p1 in zip(*ranks):
            assert p0["step"].item() == p1["step"].item() == step  # counters stay local and keep counting
            for key in ("exp_avg", "exp_avg_sq"):
                if policy == "reset" and step % 3 == 0:
                    assert not p0[key].any() and not p1[key].any()
                else:  # rank-dependent data: local states differ
                    assert not torch.equal(p0[key], p1[key])


# --------------------------------------------------------------------------- registration, CLI, errors
def test_registered_strings_and_double_import():
    import importlib

    importlib.reload(lightning_desloc)  # importing twice must not raise
    trainer = quiet_trainer(strategy="desloc")
    assert isinstance(trainer.strategy, DeslocStrategy)
    assert trainer.strategy.schedule.param_sync_every == 256
    assert trainer.strategy._start_method == "popen"
    assert quiet_trainer(strategy="desloc_spawn").strategy._start_method == "spawn"


def test_lightning_cli_class_path_reaches_every_argument(capsys):
    args = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.logger=false",
        "--trainer.strategy=lightning_desloc.DeslocStrategy",
        "--trainer.strategy.param_sync_every=32",
        "--trainer.strategy.state_sync_every={exp_avg: 64, exp_avg_sq: 640}",
        "--trainer.strategy.validate_on=local",
    ]
    cli = LightningCLI(Regression, run=False, args=args)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeslocStrategy)
    assert strategy.schedule.period_of("exp_avg") == 64
    assert strategy.schedule.period_of("exp_avg_sq") == 640
    assert strategy.schedule.period_of("momentum_buffer") == 96
    assert strategy.validate_on == "local"
    cli = LightningCLI(Regression, run=False, args=["--trainer.strategy=desloc", "--trainer.logger=false"])
    assert isinstance(cli.trainer.strategy, DeslocStrategy)
    with pytest.raises(SystemExit):
        LightningCLI(Regression, run=False, args=["--trainer.strategy={class_path: lightning_desloc.DeslocStrategy}",
                                                  "--print_config"])
    printed = capsys.readouterr().out
    for arg in ("param_sync_every: 256", "state_sync_every: null", "validate_on: consensus",
                "state_policy: average", "bucket_cap_mb:", "start_method: popen"):
        assert arg in printed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(param_sync_every=0), "param_sync_every must be a positive integer"),
        (dict(param_sync_every=1.5), "param_sync_every must be a positive integer"),
        (dict(state_sync_every={"exp_avg": -2}), r"state_sync_every\['exp_avg'\]"),
        (dict(validate_on="sometimes"), "validate_on must be"),
        (dict(bucket_cap_mb=0), "bucket_cap_mb must be a positive"),
        (dict(state_policy="reset", state_sync_every=4), "state_sync_every must be None"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeslocStrategy(**kwargs)


def test_sync_batchnorm_is_rejected_before_any_process_starts():
    with pytest.raises(ValueError, match="sync_batchnorm=False"):
        quiet_trainer(strategy="desloc", sync_batchnorm=True)


def test_optimizer_state_without_a_period_fails_at_the_first_step():
    # Adafactor keeps factored second moments ('row_var', 'col_var', 'variance'): no default period
    trainer = quiet_trainer(strategy=DeslocStrategy(param_sync_every=4), devices=1, max_steps=2,
                            limit_val_batches=0)
    try:
        with pytest.raises(ValueError, match=r"col_var.*row_var.*state_sync_every=\{"):
            trainer.fit(Regression(optimizer="adafactor"))
    finally:
        # devices=1 runs in this process: free the process group (and its port) for the next tests' workers
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- ledger in the logger
def test_ledger_is_logged_at_each_sync_round(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    strategy = DeslocStrategy(param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 6},
                              start_method=START_METHOD)
    logger = CSVLogger(tmp_path, name="run", version=0)
    quiet_trainer(strategy=strategy, max_steps=6, limit_val_batches=0, logger=logger, log_every_n_steps=1).fit(
        Regression(n_batches=6)
    )
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = [r for r in rows if r.get("comm/bytes/params")]
    model_bytes = N_PARAMS * 4
    # syncs after steps 2, 4, 6: params each time, exp_avg after 4, exp_avg_sq after 6
    assert [float(r["comm/bytes/params"]) for r in logged] == [model_bytes, 2 * model_bytes, 3 * model_bytes]
    assert float(logged[-1]["comm/bytes/state/exp_avg"]) == model_bytes
    assert float(logged[-1]["comm/bytes/state/exp_avg_sq"]) == model_bytes
    assert float(logged[-1]["comm/bytes_ddp_equivalent"]) == 6 * model_bytes


# --------------------------------------------------------------------------- logging with two optimizers
class TwoOptimizers(Regression):
    """A GAN-like module: manual optimization, one optimizer per layer, the loss logged every batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.manual_backward(loss)
            opt.step()
        self.log("train_loss", loss, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[0].parameters(), lr=1e-2), torch.optim.SGD(self.net[2].parameters(), lr=1e-2)]


def test_comm_metrics_land_on_the_users_steps_one_row_per_batch(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    strategy = DeslocStrategy(param_sync_every=2, state_sync_every=4, start_method=START_METHOD)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_val_batches=0, log_every_n_steps=1,
                            logger=CSVLogger(str(tmp_path), name="two"))
    trainer.fit(TwoOptimizers(n_batches=8))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    user_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    comm_steps = [int(r["step"]) for r in rows if r.get("comm/bytes_total")]
    assert user_steps == list(range(8))  # Lightning's per-batch step, while global_step moves twice per batch
    # each optimizer averages after its steps 2, 4, 6, 8, i.e. in batches 1, 3, 5, 7: one row per batch,
    # at the step the batch's loss is logged at (global_step would have put them at 2, 3, 6, 7, ...); then
    # the end-of-fit average after the last batch (with two optimizers the core does not claim the
    # parameters are still equal, so it averages once more)
    assert comm_steps == [1, 3, 5, 7, 8]


def test_a_fit_shorter_than_one_period_is_told_once():
    from types import SimpleNamespace

    def strategy_for(total_steps, **kwargs):
        from lightning.fabric.plugins.environments import LightningEnvironment

        env = LightningEnvironment()
        env.set_world_size(2)
        strategy = DeslocStrategy(cluster_environment=env, **kwargs)
        strategy._lightning_module = SimpleNamespace(_trainer=SimpleNamespace(estimated_stepping_batches=total_steps))
        return strategy

    with pytest.warns(UserWarning, match=r"40 optimizer steps, fewer than param_sync_every=64.*param_sync_every=5\)"):
        strategy_for(40, param_sync_every=64)._warn_if_shorter_than_a_period()
    with pytest.warns(UserWarning, match="after ddp_warmup_steps=30"):
        strategy_for(80, param_sync_every=64, ddp_warmup_steps=30)._warn_if_shorter_than_a_period()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy_for(64, param_sync_every=64)._warn_if_shorter_than_a_period()  # one average: fine
        strategy_for(float("inf"), param_sync_every=64)._warn_if_shorter_than_a_period()  # unknown length
        strategy_for(10, param_sync_every="auto")._warn_if_shorter_than_a_period()


class SharingProbe(Regression):
    def on_train_start(self):
        shared = [p.is_shared() for p in self.parameters()]
        torch.save(shared, f"{self.out_dir}/shared{self.global_rank}.pt")


def test_forkserver_workers_train_their_own_copies(tmp_path):
    # torch hands CPU tensors to the workers in shared memory; Lightning copies them out for "spawn" only,
    # so without the strategy's own copy every rank would step the same parameters
    strategy = DeslocStrategy(param_sync_every=8, start_method="forkserver")
    quiet_trainer(strategy=strategy, max_steps=2, limit_val_batches=0).fit(SharingProbe(n_batches=2, out_dir=str(tmp_path)))
    for r in range(2):
        assert not any(torch.load(tmp_path / f"shared{r}.pt")), f"rank {r} trains parameters in shared memory"
