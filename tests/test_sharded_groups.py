"""shard_within_group=True: FSDP2 inside each group of 2, DES-LOC across 2 groups, on 4 real processes
(gloo), against the unsharded hierarchical run (DDP inside the groups) of the same model and data.

Every rank's local shards of the parameters and Adam states after every step must equal the matching
rows of the unsharded run's full tensors; the bytes across groups per round are the local shard bytes
(by hand and counted at torch.distributed); parameters + gradients + states per rank take 1/g of the
unsharded memory (measured from the local storages). Plus the clear errors."""

import inspect
import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from torch.utils.data import DataLoader

from lightning_desloc import DeslocStrategy
from lightning_desloc.config import DeslocConfig
from lightning_desloc.sharding import is_dtensor, local_storage_bytes, local_tensor
from lightning_desloc.strategy import _LedgerReturningLauncher
from helpers import quiet_trainer, run_on_processes

G_SIZE, WORLD = 2, 4
STEPS, K_X = 8, 4
STATES = {"exp_avg": 4, "exp_avg_sq": 8}
IN, HIDDEN, OUT = 4, 8, 2  # every dim 0 (8, 8, 2, 2) splits evenly in 2: local shards are exactly half
N_FULL = IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT
N_LOCAL = N_FULL // G_SIZE  # 29 elements of float64 per rank
BATCH = 4


def batch_for(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, IN, generator=g, dtype=torch.float64)
    return x, x[:, :OUT] * (1 + rank)


class _Counting:
    """``torch.distributed`` collectives wrapped in the worker (once per process): payload bytes and calls
    per (name, group's ranks); :meth:`reset` before each fit."""

    installed = None

    def __init__(self):
        self.reset()
        for name in ("all_reduce", "broadcast", "reduce_scatter_single", "reduce_scatter_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    @classmethod
    def fresh(cls):
        if cls.installed is None:
            cls.installed = cls()
        cls.installed.reset()
        return cls.installed

    def reset(self):
        self.bytes, self.calls = {}, {}

    def _wrap(self, name, fn):
        signature = inspect.signature(fn)

        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            tensor, group = bound.get("tensor", bound.get("output")), bound.get("group")
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            key = f"{name}{list(ranks)}"
            self.bytes[key] = self.bytes.get(key, 0) + tensor.numel() * tensor.element_size()
            self.calls[key] = self.calls.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counted


class ShardProbe(L.LightningModule):
    def __init__(self, out_dir, tag, user_shards=False, poison=None):
        super().__init__()
        self.poison = poison  # (rank, batch index): that rank's loss is made infinite there
        torch.manual_seed(0)  # every rank, every run: the same weights (group 0 must initialise alike)
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)).double()
        self.out_dir, self.tag, self.user_shards = out_dir, tag, user_shards

    def setup(self, stage):
        self.counting = _Counting.fresh()
        if self.global_rank >= G_SIZE:  # group 1 starts elsewhere: setup must give it group 0's weights
            with torch.no_grad():
                for p in self.net.parameters():
                    p.add_(1.0)
        self.history, self.validated, self.before_batch = [], [], []

    def configure_model(self):
        if self.user_shards and self.device_mesh is not None:
            from torch.distributed.fsdp import fully_shard

            # "hsdp": the whole 2-D mesh, which would all-reduce the gradients across groups every step
            fully_shard(self.net, mesh=self.device_mesh if self.user_shards == "hsdp" else self.device_mesh["shard"])

    def train_dataloader(self):
        rank = self.trainer.global_rank
        return DataLoader([batch_for(rank, s) for s in range(STEPS)], batch_size=None)

    def training_step(self, batch, batch_idx):
        # the batch of this optimizer step (the loader's batch of the same index in the first epoch), so that
        # a run resumed mid-epoch sees the batches the uninterrupted run saw
        x, y = batch_for(self.global_rank, self.trainer.global_step)
        dtype = next(self.net.parameters()).dtype  # bfloat16 under precision="bf16-true"
        loss = torch.nn.functional.mse_loss(self.net(x.to(dtype)), y.to(dtype))
        return loss * float("inf") if self.poison == (self.global_rank, batch_idx) else loss

    def val_dataloader(self):
        return DataLoader([batch_for(self.trainer.global_rank, 99)], batch_size=None)

    def validation_step(self, batch, batch_idx):  # what validation sees: the consensus of the local shards
        self.validated.append([local_tensor(p).clone() for p in self.parameters()])

    def on_train_batch_start(self, batch, batch_idx):  # after a validation: the rank's own shards again
        self.before_batch.append([local_tensor(p).clone() for p in self.parameters()])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def _snapshot(self):
        opt = self.trainer.optimizers[0]
        params = list(self.parameters())
        return {"params": [local_tensor(p).clone() for p in params],
                "state": {k: [local_tensor(opt.state[p][k]).clone() for p in params] for k in STATES}}

    def on_train_start(self):
        self.history.append({"params": [local_tensor(p).clone() for p in self.parameters()]})

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.history.append(self._snapshot())

    def on_fit_end(self):
        opt = self.trainer.optimizers[0]
        params = list(self.parameters())
        states = [v for p in params for k, v in opt.state[p].items() if k in STATES]
        strategy = self.trainer.strategy
        torch.save({
            "history": self.history, "validated": self.validated, "before_batch": self.before_batch,
            "final": [local_tensor(p).clone() for p in params],
            "memory": {"params": local_storage_bytes(params), "grads": local_storage_bytes([p.grad for p in params]),
                       "states": local_storage_bytes(states)},
            "ledger": dict(strategy.ledger.bytes), "group_ledger": dict(strategy.group_ledger.bytes),
            "ddp_equivalent_bytes": strategy.ledger.ddp_equivalent_bytes,
            "dist_bytes": dict(self.counting.bytes), "dist_calls": dict(self.counting.calls),
            "types": [type(p).__name__ for p in params],
        }, f"{self.out_dir}/{self.tag}{self.global_rank}.pt")


def det_init(out_features, in_features):
    """A deterministic, position-dependent initialisation (float64), recomputed by the tests."""
    w = torch.linspace(-2.0, 2.0, out_features * in_features, dtype=torch.float64).reshape(out_features, in_features)
    return w.sin() * 0.5, torch.linspace(-0.1, 0.1, out_features, dtype=torch.float64)


class DetLinear(torch.nn.Linear):
    """Linear whose reset_parameters writes :func:`det_init`, on whole tensors and on FSDP2 shards alike
    (each rank writes its own rows, no collective), as a model materialised from the meta device needs."""

    def reset_parameters(self):
        if self.weight.is_meta:
            return
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for param, full in zip((self.weight, self.bias), det_init(self.out_features, self.in_features)):
                if is_dtensor(param):
                    full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                             src_data_rank=None)
                param.copy_(full)


def det_net(device=None):
    return torch.nn.Sequential(DetLinear(IN, HIDDEN, dtype=torch.float64, device=device), torch.nn.Tanh(),
                               DetLinear(HIDDEN, OUT, dtype=torch.float64, device=device))


class MetaProbe(ShardProbe):
    """ShardProbe with the DetLinear net: built in __init__ (``meta=False``) or in configure_model on the
    meta device (``meta=True``: shapes only, as for a model bigger than one device; the strategy shards it
    and materialises it with reset_parameters)."""

    def __init__(self, out_dir, tag, meta):
        super().__init__(out_dir, tag)
        self.meta = meta
        self.net = None if meta else det_net()

    def setup(self, stage):  # no perturbation of group 1: the meta net does not exist yet here
        self.counting = _Counting.fresh()
        self.history, self.validated, self.before_batch = [], [], []

    def configure_model(self):
        if self.meta and self.net is None:
            with torch.device("meta"):
                self.net = det_net()


class SaveAt(L.Callback):
    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _trainer(max_steps, trainer_kwargs=None, **kwargs):
    # in already-joined processes (LOCAL_RANK set: Lightning launches nothing), so one set of 4 workers
    # runs every fit; peer_timeout_s=None: no liveness thread per fit
    strategy = DeslocStrategy(group_size=G_SIZE, state_sync_every=STATES, peer_timeout_s=None,
                              cluster_environment=LightningEnvironment(), **kwargs)
    return quiet_trainer(strategy=strategy, devices=WORLD, max_steps=max_steps,
                         **{"limit_val_batches": 0, **(trainer_kwargs or {})})


def _fits(rank, world_size, out_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    _trainer(STEPS, param_sync_every=K_X).fit(ShardProbe(out_dir, "ddp"))  # the unsharded reference
    _trainer(STEPS, param_sync_every=K_X, shard_within_group=True).fit(ShardProbe(out_dir, "fsdp"))
    # on_nonfinite="heal" with rank 2's loss infinite at step 3: FSDP2 (or DDP) inside group 1 spreads it to
    # rank 3, step 4's outer round (params, exp_avg) leaves group 1 out, step 5's full round heals exp_avg_sq
    for tag, sharded in (("ddp-heal", False), ("fsdp-heal", True)):
        _trainer(STEPS, param_sync_every=K_X, shard_within_group=sharded, on_nonfinite="heal").fit(
            ShardProbe(out_dir, tag, poison=(2, 2)))
    # bf16-true: the module converted to bfloat16 before it is sharded; the rounds across groups average the
    # bfloat16 local shards (summed in float32, rounded once)
    for tag, sharded in (("ddp-bf16", False), ("fsdp-bf16", True)):
        _trainer(STEPS, dict(precision="bf16-true"), param_sync_every=K_X, shard_within_group=sharded).fit(
            ShardProbe(out_dir, tag))
    # a net built on the meta device in configure_model, materialised by the strategy, against the same net
    # built whole (unsharded groups)
    _trainer(STEPS, param_sync_every=K_X).fit(MetaProbe(out_dir, "ddp-det", meta=False))
    _trainer(STEPS, param_sync_every=K_X, shard_within_group=True).fit(MetaProbe(out_dir, "fsdp-meta", meta=True))
    # compression="bf16" (parameters and states): coded element by element, on the shards as on the whole tensors
    for tag, sharded in (("ddp-bf16wire", False), ("fsdp-bf16wire", True)):
        _trainer(STEPS, param_sync_every=K_X, shard_within_group=sharded, compression="bf16").fit(ShardProbe(out_dir, tag))
    # sharded by the module in configure_model; consensus validation after steps 2 and 4 (between averages),
    # and 4 steps end between averages (K_x = 3): the end-of-fit consensus
    trainer = _trainer(4, dict(limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0), param_sync_every=3, shard_within_group=True)
    trainer.fit(ShardProbe(out_dir, "user", user_shards=True))
    # what the spawn launcher hands the main process: the whole consensus tensors (gathered in each group)
    launcher = _LedgerReturningLauncher(trainer.strategy, start_method="spawn")
    output = launcher._collect_rank_zero_results(trainer, None)
    if rank == 0:
        torch.save(torch.load(output.weights_path), f"{out_dir}/main_process_weights.pt")
    # checkpoints: a save after step 6 (between rounds; exp_avg averaged at 4, exp_avg_sq not yet) that must
    # not change the run, then a resume from it with the same layout
    saves = SaveAt(f"{out_dir}/ckpt6", 6)
    _trainer(STEPS, dict(callbacks=[saves]), param_sync_every=K_X, shard_within_group=True).fit(
        ShardProbe(out_dir, "fsdp-save"))
    _trainer(STEPS, param_sync_every=K_X, shard_within_group=True).fit(
        ShardProbe(out_dir, "fsdp-resumed"), ckpt_path=f"{out_dir}/ckpt6")
    # sharded over the whole 2-D mesh (HSDP) in configure_model: refused before any collective of setup
    with pytest.raises(ValueError, match="HSDP"):
        _trainer(1, param_sync_every=3, shard_within_group=True).fit(ShardProbe(out_dir, "never", user_shards="hsdp"))
    torch.save("done", f"{out_dir}/done{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    run_on_processes(_fits, WORLD, str(out))
    assert all((out / f"done{r}.pt").exists() for r in range(WORLD))
    load = lambda tag: [torch.load(out / f"{tag}{r}.pt") for r in range(WORLD)]  # noqa: E731
    return {"ddp": load("ddp"), "fsdp": load("fsdp"), "user": load("user"),
            "ddp-heal": load("ddp-heal"), "fsdp-heal": load("fsdp-heal"),
            "fsdp-save": load("fsdp-save"), "fsdp-resumed": load("fsdp-resumed"), "out": out,
            "ddp-bf16": load("ddp-bf16"), "fsdp-bf16": load("fsdp-bf16"),
            "ddp-bf16wire": load("ddp-bf16wire"), "fsdp-bf16wire": load("fsdp-bf16wire"),
            "ddp-det": load("ddp-det"), "fsdp-meta": load("fsdp-meta"),
            "main": torch.load(out / "main_process_weights.pt")}


def _chunk(full, position, size):
    """The rows FSDP2 keeps at ``position`` of ``size`` ranks: ``torch.chunk``'s split (uneven when ``size``
    does not divide the rows; the last positions may hold none)."""
    chunks = torch.chunk(full, size, dim=0)
    return chunks[position] if position < len(chunks) else full[:0]


def _rows(full, position):
    """The rows of ``full`` that FSDP2 (Shard(0) over the G_SIZE ranks of a group) keeps at ``position``."""
    return _chunk(full, position, G_SIZE)


def _assert_rows(got, want, position, msg, size=G_SIZE, **tolerance):
    """``got`` (a rank's local shards: "params", and "state" by key) are the rows of ``want`` (full tensors)
    at ``position`` of ``size``; float64 tolerance unless given."""
    tolerance = {"rtol": 1e-12, "atol": 1e-12, **tolerance}
    for a, b in zip(got["params"], want["params"]):
        torch.testing.assert_close(a, _chunk(b, position, size), msg=msg, **tolerance)
    for key in got.get("state", {}):
        for a, b in zip(got["state"][key], want["state"][key]):
            torch.testing.assert_close(a, _chunk(b, position, size), msg=f"{msg} {key}", **tolerance)


def _assert_history_rows(got, want, position, msg, **tolerance):
    """:func:`_assert_rows` after every step of two runs' histories."""
    for step, (g, w) in enumerate(zip(got, want)):
        _assert_rows(g, w, position, f"{msg} step {step}", **tolerance)


def test_every_shard_equals_the_unsharded_groups_after_every_step(runs):
    plain, sharded = runs["ddp"], runs["fsdp"]
    assert all(t == "DTensor" for r in sharded for t in r["types"]) and all(t == "Parameter" for t in plain[0]["types"])
    for rank in range(WORLD):
        position = rank % G_SIZE
        got, want = sharded[rank], plain[rank]
        assert len(got["history"]) == len(want["history"]) == STEPS + 1
        _assert_history_rows(got["history"], want["history"], position, f"rank {rank}")
        for a, b in zip(got["final"], want["final"]):
            torch.testing.assert_close(a, _rows(b, position), rtol=1e-12, atol=1e-12)


def _simulate_groups(steps):
    """A reference written from the rules, independent of the package: 2 groups of 2 ranks, each group one
    model (DDP or FSDP2 inside a group: one step of torch's Adam, lr 0.05, on the mean gradient of its ranks'
    batches), both starting from group 0's initial weights; right after step s the groups' parameters are
    averaged if s % K_x == 0, and each Adam moment k if s % K_k == 0 (Adam's step counter never). Returns,
    per step (0: the start), the groups' full parameters and moments."""
    import copy

    torch.manual_seed(0)  # as ShardProbe.__init__: group 0's weights, which setup gives group 1
    start = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)).double()
    nets = [copy.deepcopy(start) for _ in range(WORLD // G_SIZE)]
    opts = [torch.optim.Adam(net.parameters(), lr=0.05) for net in nets]

    def mean_into(tensors):
        mean = sum(t.detach().clone() for t in tensors) / len(tensors)
        with torch.no_grad():
            for t in tensors:
                t.copy_(mean)

    def record():
        return [{"params": [p.detach().clone() for p in net.parameters()],
                 "state": {k: [opt.state[p][k].clone() for p in net.parameters()] for k in STATES if opt.state}}
                for net, opt in zip(nets, opts)]

    history = [record()]
    for s in range(1, steps + 1):
        for g, (net, opt) in enumerate(zip(nets, opts)):
            opt.zero_grad()
            ranks = range(g * G_SIZE, (g + 1) * G_SIZE)  # training_step of step s sees global_step s - 1
            loss = sum(torch.nn.functional.mse_loss(net(x), y) for x, y in (batch_for(r, s - 1) for r in ranks))
            (loss / G_SIZE).backward()
            opt.step()
        params = [list(net.parameters()) for net in nets]
        for i in range(len(params[0])):
            if s % K_X == 0:
                mean_into([ps[i] for ps in params])
            for key, period in STATES.items():
                if s % period == 0:
                    mean_into([opt.state[ps[i]][key] for opt, ps in zip(opts, params)])
        history.append(record())
    return history


def test_every_shard_equals_the_reference_simulator_after_every_step(runs):
    want = _simulate_groups(STEPS)
    for rank in range(WORLD):
        group, position = rank // G_SIZE, rank % G_SIZE
        _assert_history_rows(runs["fsdp"][rank]["history"], [w[group] for w in want], position, f"rank {rank}",
                             rtol=1e-10)
    # the groups really differ between rounds (or the comparison would say little about the schedule)
    assert not torch.equal(want[3][0]["params"][0], want[3][1]["params"][0])
    assert not torch.equal(want[5][0]["state"]["exp_avg_sq"][0], want[5][1]["state"]["exp_avg_sq"][0])


def test_heal_on_shards_equals_heal_of_the_unsharded_groups_after_every_step(runs):
    """The unsharded heal is checked against a simulator in test_nonfinite_combinations.py; the sharded one
    must give every rank the matching rows of it: the NaN of group 1 (step 3) is left out of step 4's outer
    round at every shard position, and step 5's full round heals the state that round did not carry."""
    plain, sharded = runs["ddp-heal"], runs["fsdp-heal"]
    nan_at_3 = [not all(bool(torch.isfinite(p).all()) for p in r["history"][3]["params"]) for r in plain]
    assert nan_at_3 == [False, False, True, True]  # the infinite gradient reached rank 3 through the group
    for rank in range(WORLD):
        position = rank % G_SIZE
        _assert_history_rows(sharded[rank]["history"], plain[rank]["history"], position, f"rank {rank}", equal_nan=True)
        last = sharded[rank]["history"][STEPS]
        assert all(bool(torch.isfinite(t).all()) for t in [*last["params"], *sum(last["state"].values(), [])])
        assert all(bool(torch.isfinite(t).all()) for t in sharded[rank]["history"][4]["params"])


def test_bf16_true_shards_average_across_groups_in_two_bytes_per_element(runs):
    """precision="bf16-true": the local shards are bfloat16 DTensors; after each parameter round (steps 4
    and 8) the ranks at a position in the two groups hold the same shards, between rounds they differ; the
    bytes across groups are 2 per local element per round (half the unsharded bf16 run's); and the run
    stays near the unsharded bf16 run (not equal: FSDP2 reduce-scatters the gradients in bfloat16, the
    unsharded groups all-reduce them summed in float32), within one Adam step (lr 0.05) per element."""
    sharded, plain = runs["fsdp-bf16"], runs["ddp-bf16"]
    for rank in range(WORLD):
        assert all(t.dtype == torch.bfloat16 for t in sharded[rank]["history"][1]["params"])
        assert all(t.dtype == torch.bfloat16 for t in plain[rank]["history"][1]["params"])
        other = (rank + G_SIZE) % WORLD
        for step in range(1, STEPS + 1):
            same = all(torch.equal(a, b) for a, b in zip(sharded[rank]["history"][step]["params"],
                                                        sharded[other]["history"][step]["params"]))
            assert same == (step % K_X == 0), (rank, step)
            for a, b in zip(sharded[rank]["history"][step]["params"], plain[rank]["history"][step]["params"]):
                assert (a.double() - _rows(b, rank % G_SIZE).double()).abs().max() <= 0.05 * step, (rank, step)
        led, ref = sharded[rank]["ledger"], plain[rank]["ledger"]
        assert led["params"] == (STEPS // K_X) * N_LOCAL * 2 and ref["params"] == G_SIZE * led["params"]
        assert led["state/exp_avg"] == (STEPS // STATES["exp_avg"]) * N_LOCAL * 2


def test_bf16_compression_on_shards_equals_the_unsharded_groups_and_sends_2_bytes_per_element(runs):
    """compression="bf16": each element is coded on its own, so every rank's local shards after every step
    equal the rows of the unsharded compressed run; across groups 2 bytes per local element per round."""
    plain, sharded = runs["ddp-bf16wire"], runs["fsdp-bf16wire"]
    for rank in range(WORLD):
        position = rank % G_SIZE
        _assert_history_rows(sharded[rank]["history"], plain[rank]["history"], position, f"rank {rank}")
        # and the coding did happen: the rounds differ from the exact run's
        assert not torch.equal(sharded[rank]["history"][K_X]["params"][0], runs["fsdp"][rank]["history"][K_X]["params"][0])
        led = sharded[rank]["ledger"]
        for cat, n in {"params": STEPS // K_X, "state/exp_avg": STEPS // STATES["exp_avg"],
                       "state/exp_avg_sq": STEPS // STATES["exp_avg_sq"]}.items():
            assert led[cat] == n * N_LOCAL * 2, (rank, cat, led)
            assert plain[rank]["ledger"][cat] == G_SIZE * led[cat]


def test_a_model_built_on_the_meta_device_is_materialised_on_the_shards(runs):
    """Before step 1 every rank holds its rows of det_init (reset_parameters on the shards); after every
    step its shards equal the rows of the same net built whole and trained in unsharded groups."""
    plain, meta = runs["ddp-det"], runs["fsdp-meta"]
    want = [*det_init(HIDDEN, IN), *det_init(OUT, HIDDEN)]
    for rank in range(WORLD):
        position = rank % G_SIZE
        assert all(t == "DTensor" for t in meta[rank]["types"])
        for a, b in zip(meta[rank]["history"][0]["params"], want):
            assert torch.equal(a, _rows(b, position)), rank
        _assert_history_rows(meta[rank]["history"], plain[rank]["history"], position, f"rank {rank}")


def test_a_save_changes_nothing_and_a_same_layout_resume_continues_bit_for_bit(runs):
    """The run that saved after step 6 is the run without the save; the run resumed from that save holds,
    on every rank, exactly the uninterrupted run's local shards of the parameters after steps 6, 7, 8 and
    of the Adam states after 7 and 8 (the local path: each rank's own shards, not the consensus)."""
    plain, saved, resumed = runs["fsdp"], runs["fsdp-save"], runs["fsdp-resumed"]
    for rank in range(WORLD):
        for step, (a, b) in enumerate(zip(saved[rank]["history"], plain[rank]["history"])):
            assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), (rank, step)
        got = resumed[rank]["history"]
        assert len(got) == 3  # the start (after the load), steps 7 and 8
        assert all(torch.equal(x, y) for x, y in zip(got[0]["params"], plain[rank]["history"][6]["params"])), rank
        for step in (7, 8):
            want = plain[rank]["history"][step]
            assert all(torch.equal(x, y) for x, y in zip(got[step - 6]["params"], want["params"])), (rank, step)
            for key in STATES:
                assert all(torch.equal(x, y) for x, y in zip(got[step - 6]["state"][key], want["state"][key])), \
                    (rank, step, key)
        # the ledger goes on from the saved one: the resumed run's bytes are the uninterrupted run's
        assert resumed[rank]["ledger"]["params"] == plain[rank]["ledger"]["params"]
    # the groups held different shards at step 6 (between parameter rounds): a consensus resume could not
    # have given these values
    assert not torch.equal(plain[0]["history"][6]["params"][0], plain[2]["history"][6]["params"][0])


def test_the_checkpoint_is_a_dcp_directory_holding_the_consensus(runs):
    """Read in this (non-distributed) process with torch's DCP alone: the parameters and Adam states are
    the mean over the two groups of the unsharded run's full tensors after step 6."""
    import torch.distributed.checkpoint as dcp

    path = runs["out"] / "ckpt6"
    assert (path / ".metadata").is_file() and (path / "meta.pt").is_file()
    assert sorted(p.name for p in (path / "desloc").iterdir()) == [f"rank{r}.pt" for r in range(WORLD)]
    plain = runs["ddp"]
    names = [n for n, _ in torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(),
                                               torch.nn.Linear(HIDDEN, OUT)).named_parameters()]
    state = {"state_dict": {f"net.{n}": torch.zeros_like(t) for n, t in zip(names, plain[0]["history"][6]["params"])}}
    dcp.load(state, checkpoint_id=str(path))
    for i, n in enumerate(names):
        want = (plain[0]["history"][6]["params"][i] + plain[2]["history"][6]["params"][i]) / 2
        torch.testing.assert_close(state["state_dict"][f"net.{n}"], want, rtol=1e-12, atol=1e-12)
    meta = torch.load(path / "meta.pt", weights_only=False)
    assert meta["global_step"] == 6 and meta["desloc"]["world_size"] == WORLD and meta["desloc"]["group_size"] == G_SIZE
    assert "state_dict" not in meta and "optimizer_states" not in meta


def test_bytes_across_groups_are_the_local_shards(runs):
    plain, sharded = runs["ddp"], runs["fsdp"]
    rounds = {"params": STEPS // K_X, "state/exp_avg": STEPS // STATES["exp_avg"],
              "state/exp_avg_sq": STEPS // STATES["exp_avg_sq"]}
    for rank in range(WORLD):
        led, ref = sharded[rank]["ledger"], plain[rank]["ledger"]
        for cat, n in rounds.items():  # by hand: 29 float64 per rank per round, half the unsharded run's
            assert led[cat] == n * N_LOCAL * 8, (rank, cat)
            assert ref[cat] == n * N_FULL * 8 == G_SIZE * led[cat]
        assert led["setup"] == N_LOCAL * 8  # group 0's shards, to the other group
        assert sharded[rank]["ddp_equivalent_bytes"] == plain[rank]["ddp_equivalent_bytes"] == STEPS * N_FULL * 8
        # counted at torch.distributed on the replicate group (the ranks at this position): the ledger's bytes
        replicate = [rank % G_SIZE + k * G_SIZE for k in range(WORLD // G_SIZE)]
        counted, calls = sharded[rank]["dist_bytes"], sharded[rank]["dist_calls"]
        # the control tensor after each outer round: the signal and on_nonfinite's flag per group, 3 float32
        # (the rest of "control" is world-wide)
        signals = (STEPS // K_X) * (1 + WORLD // G_SIZE) * 4
        assert counted[f"all_reduce{replicate}"] == sum(led[c] for c in rounds) + signals, (rank, counted)
        assert counted[f"broadcast{replicate}"] == led["setup"]
        # inside the group: FSDP2's reduce-scatter every step (one fully_shard unit), the core sends no gradient
        group = [rank // G_SIZE * G_SIZE + i for i in range(G_SIZE)]
        assert sum(v for k, v in calls.items() if k.startswith("reduce_scatter") and k.endswith(f"{group}")) == STEPS
        assert calls.get(f"all_reduce{group}", 0) == STEPS // K_X  # only the signals after the outer rounds
        assert "grads" not in sharded[rank]["group_ledger"] and "grads" in plain[rank]["group_ledger"]


def test_memory_per_rank_is_one_gth_of_the_unsharded_run(runs):
    for rank in range(WORLD):
        got, want = runs["fsdp"][rank]["memory"], runs["ddp"][rank]["memory"]
        assert want == {"params": N_FULL * 8, "grads": N_FULL * 8, "states": 2 * N_FULL * 8}
        assert {k: G_SIZE * v for k, v in got.items()} == want, (got, want)


def test_user_sharding_in_configure_model_ends_on_the_consensus(runs):
    user = runs["user"]
    assert all(t == "DTensor" for r in user for t in r["types"])
    for rank in range(G_SIZE):  # position `rank` in group 0 and in group 1 end equal
        for a, b in zip(user[rank]["final"], user[rank + G_SIZE]["final"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one scheduled parameter round (step 3), then the end-of-fit consensus: each on the local shard
    assert all(r["ledger"]["params"] == 2 * N_LOCAL * 8 for r in user)
    # consensus validation after steps 2 and 4: one exact round of the local shards each; every position
    # saw the mean of its two groups' shards, and got its own shards back for the next step
    assert all(r["ledger"]["eval"] == 2 * N_LOCAL * 8 for r in user)
    for rank in range(WORLD):
        mine, other = user[rank], user[(rank + G_SIZE) % WORLD]
        for v, a, b in zip(mine["validated"][0], mine["history"][2]["params"], other["history"][2]["params"]):
            torch.testing.assert_close(v, (a + b) / 2, rtol=1e-12, atol=1e-12)
        for a, b in zip(mine["before_batch"][2], mine["history"][2]["params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the spawn launcher's weights for the main process: the shards side by side
    for (name, full), *shards in zip(runs["main"].items(), *(user[r]["final"] for r in range(G_SIZE))):
        torch.testing.assert_close(full, torch.cat(shards), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shard_within_group=True), "group_size is None"),
    (dict(shard_within_group=True, group_size=2, group_param_sync_every=4), "group_param_sync_every=1"),
    (dict(shard_within_group=True, group_size=2, compression="int8"), "does not support compression.*int8"),
    (dict(shard_within_group=True, group_size=2, compression={"params": "bf16", "states": "int8"}),
     r"int8 for \['states'\]; bf16 works"),
    (dict(shard_within_group=True, group_size=2, outer_lr=0.7), "outer_lr"),
    (dict(shard_within_group=True, group_size=2, param_sync_every="auto"), "param_sync_every='auto'"),
    (dict(shard_within_group=True, group_size=2, max_drift=0.1), "max_drift"),
    (dict(shard_within_group=True, group_size=2, ddp_warmup_steps=4), "ddp_warmup_steps"),
    (dict(shard_within_group=True, group_size=2, state_policy="reset"), "state_policy='reset'"),
    (dict(shard_within_group=True, group_size=2, param_sync_every=8, fragments=2), "fragments"),
    (dict(shard_within_group=True, group_size=2, param_sync_every=8, overlap_steps=2), "overlap_steps"),
    (dict(shard_within_group="yes", group_size=2), "True or False"),
])
def test_clear_errors_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeslocStrategy(**kwargs)
    assert DeslocConfig.from_arguments(group_size=2, shard_within_group=True).shard_within_group
    assert DeslocConfig.from_arguments(group_size=2, shard_within_group=True, compression="bf16").compression


def test_clear_errors_before_any_process_starts(tmp_path):
    model = ShardProbe(str(tmp_path), "never")
    with pytest.raises(ValueError, match="group_size=3 to divide the number of processes"):
        quiet_trainer(strategy=DeslocStrategy(group_size=3, shard_within_group=True, start_method="spawn"),
                      devices=4, max_steps=1)
    with pytest.raises(ValueError, match="sync_batchnorm"):
        quiet_trainer(strategy=DeslocStrategy(group_size=2, shard_within_group=True, start_method="spawn"),
                      devices=4, sync_batchnorm=True)
    del model


# --------------------------------------------------------------------------- the 4-process checkpoint, resumed on 2
class ResumeProbe(ShardProbe):
    """ShardProbe that also records the Adam states right after the load (what the resume restored)."""

    def on_train_start(self):
        self.history.append(self._snapshot())


class PlainFSDPProbe(L.LightningModule):
    """A module of Lightning's own ModelParallelStrategy (no DES-LOC): FSDP2 over the data-parallel mesh."""

    def __init__(self, out_dir):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)).double()
        self.out_dir = out_dir

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def val_dataloader(self):
        return DataLoader([batch_for(0, 99)], batch_size=None)

    def validation_step(self, batch, batch_idx):
        full = [p.full_tensor().clone() for p in self.parameters()]
        torch.save({"full": full, "types": [type(p).__name__ for p in self.parameters()]},
                   f"{self.out_dir}/modelparallel{self.global_rank}.pt")


RESUMED_WORLD = 3  # FSDP2 over 3 ranks splits the rows unevenly (8 -> 3, 3, 2 and 2 -> 1, 1, 0)


def _resumed_fits(rank, world_size, out_dir):
    """3 processes resume the 4-process checkpoint ckpt6 (2 groups of 2): into 1 group of 3 and into 3 groups
    of 1 (both the consensus path: another layout), and Lightning's ModelParallelStrategy validates it."""
    os.environ["LOCAL_RANK"] = str(rank)
    for tag, group_size in (("one-group", RESUMED_WORLD), ("singles", 1)):
        strategy = DeslocStrategy(group_size=group_size, shard_within_group=True, param_sync_every=K_X,
                                  state_sync_every=STATES, peer_timeout_s=None, cluster_environment=LightningEnvironment())
        trainer = quiet_trainer(strategy=strategy, devices=world_size, max_steps=STEPS, limit_val_batches=0)
        trainer.fit(ResumeProbe(out_dir, tag), ckpt_path=f"{out_dir}/ckpt6")
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = quiet_trainer(strategy=ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1),
                            devices=world_size)
    trainer.validate(PlainFSDPProbe(out_dir), ckpt_path=f"{out_dir}/ckpt6")
    torch.save("done", f"{out_dir}/resumed-done{rank}.pt")


@pytest.fixture(scope="module")
def resumed(runs):
    out = runs["out"]
    run_on_processes(_resumed_fits, RESUMED_WORLD, str(out))
    assert all((out / f"resumed-done{r}.pt").exists() for r in range(RESUMED_WORLD))
    load = lambda tag: [torch.load(out / f"{tag}{r}.pt") for r in range(RESUMED_WORLD)]  # noqa: E731
    return {"one-group": load("one-group"), "singles": load("singles"), "modelparallel": load("modelparallel")}


def _consensus_at_6(runs):
    """The expectation, from the unsharded 4-process run: the mean of its two groups' full tensors after
    step 6 (ranks 0 and 2 hold their groups' values)."""
    a, b = runs["ddp"][0]["history"][6], runs["ddp"][2]["history"][6]
    return {"params": [(x + y) / 2 for x, y in zip(a["params"], b["params"])],
            "state": {k: [(x + y) / 2 for x, y in zip(a["state"][k], b["state"][k])] for k in STATES}}


def _adam_steps(start, gradient_batches, steps_done):
    """A small reference, independent of the strategy: torch's Adam (lr 0.05) on the full model from
    ``start`` (params and states after ``steps_done`` steps), one step per entry of ``gradient_batches``,
    each the mean gradient over that entry's batches. Returns the params and states after each step."""
    net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)).double()
    params = list(net.parameters())
    with torch.no_grad():
        for p, v in zip(params, start["params"]):
            p.copy_(v)
    opt = torch.optim.Adam(params, lr=0.05)
    for i, p in enumerate(params):
        opt.state[p] = {"step": torch.tensor(float(steps_done)),
                        **{k: start["state"][k][i].clone() for k in STATES}}
    after = []
    for batches in gradient_batches:
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(net(x), y) for x, y in batches) / len(batches)
        loss.backward()
        opt.step()
        after.append({"params": [p.detach().clone() for p in params],
                      "state": {k: [opt.state[p][k].clone() for p in params] for k in STATES}})
    return after


def test_two_groups_resume_into_one_group_of_three_from_the_consensus(resumed, runs):
    """Another layout: the consensus path. The 3 ranks (one group, FSDP2 over 3: uneven shards) start from
    their rows of the mean of the two saved groups, with Adam's step counter at 6; steps 7 and 8 are then
    plain data parallelism over 3 ranks, which the reference computes with torch's Adam on the mean gradient."""
    start = _consensus_at_6(runs)
    want = [start, *_adam_steps(start, [[batch_for(r, s) for r in range(RESUMED_WORLD)] for s in (6, 7)], 6)]
    for rank, got in enumerate(resumed["one-group"]):
        assert len(got["history"]) == 3
        # one group: nothing crosses groups, the ledger is the saved one (see the next test)
        assert {k: got["ledger"].get(k, 0) for k in ("params", "state/exp_avg", "state/exp_avg_sq", "checkpoint")} \
            == {"params": N_LOCAL * 8, "state/exp_avg": N_LOCAL * 8, "state/exp_avg_sq": 0, "checkpoint": 3 * N_LOCAL * 8}
        for step, (g, w) in enumerate(zip(got["history"], want)):
            _assert_rows(g, w, rank, f"rank {rank} after step {6 + step}", size=RESUMED_WORLD)


def test_two_groups_resume_into_three_groups_of_one_from_the_consensus(resumed, runs):
    """Three groups of one rank each (FSDP2 over a single rank: whole tensors): each starts from the consensus,
    takes step 7 alone on its own batch, and step 8's round averages the parameters and both Adam states."""
    start = _consensus_at_6(runs)
    alone = [_adam_steps(start, [[batch_for(r, 6)], [batch_for(r, 7)]], 6) for r in range(RESUMED_WORLD)]
    mean = lambda ts: sum(ts) / len(ts)  # noqa: E731
    averaged = {"params": [mean(ts) for ts in zip(*(a[1]["params"] for a in alone))],
                "state": {k: [mean(ts) for ts in zip(*(a[1]["state"][k] for a in alone))] for k in STATES}}
    for rank, got in enumerate(resumed["singles"]):
        assert all(t == "DTensor" for t in got["types"])
        for step, want in enumerate((start, alone[rank][0], averaged)):
            _assert_rows(got["history"][step], want, 0, f"rank {rank} after step {6 + step}", size=1)
    # the ledger goes on from the saved one (by hand: step 4's round of params and exp_avg, 29 float64 per
    # rank, and the save's consensus of all three); step 8's round adds whole tensors of all three
    saved = {"params": N_LOCAL * 8, "state/exp_avg": N_LOCAL * 8, "checkpoint": 3 * N_LOCAL * 8}
    for got in resumed["singles"]:
        assert {k: got["ledger"].get(k, 0) for k in (*saved, "state/exp_avg_sq")} == {
            "params": saved["params"] + N_FULL * 8, "state/exp_avg": saved["state/exp_avg"] + N_FULL * 8,
            "checkpoint": saved["checkpoint"], "state/exp_avg_sq": N_FULL * 8}


def test_lightning_model_parallel_strategy_validates_the_checkpoint_without_desloc(resumed, runs):
    """Lightning's ModelParallelStrategy (FSDP2 over 3 ranks, no DES-LOC) loads the directory in
    ``trainer.validate(ckpt_path=...)``: its model holds the consensus."""
    start = _consensus_at_6(runs)
    for got in resumed["modelparallel"]:
        assert all(t == "DTensor" for t in got["types"])
        for a, b in zip(got["full"], start["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
