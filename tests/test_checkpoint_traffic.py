"""What a checkpoint save sends, counted twice (the ledger, and torch.distributed's calls wrapped in the
worker for the save only), on real gloo processes; tied weights saved inside consensus validation; the
outer step peeked slice by slice against the live step.

Expectations are computed here: the bytes by hand from the model's shapes, the means from the ranks'
shards as read back with plain ``torch.load``.
"""

import glob
import json
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckpt_models import IN, OUT, FrozenStemNet, Recorder, SaveProbe, TiedLM
from lightning_desloc import DeslocStrategy
from lightning_desloc.outer import OuterOptimizer
from helpers import START_METHOD, run_on_processes

HIDDEN = 16
STEM = IN * HIDDEN + HIDDEN  # frozen: never sent
HEAD = HIDDEN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT  # trained: parameters, exp_avg, exp_avg_sq
FLOAT32 = 4
BUCKET_CAP_BYTES = 1024  # smaller than the model: a save goes out in several buckets


def trainer(out, callbacks, max_steps=None, max_epochs=None, **strategy):
    return L.Trainer(
        accelerator="cpu", devices=2, default_root_dir=str(out), max_steps=max_steps or -1, max_epochs=max_epochs,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(
            any(isinstance(c, ModelCheckpoint) for c in callbacks)),
        use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=callbacks,
        strategy=DeslocStrategy(start_method=START_METHOD, **strategy),
    )


def shards_of(main_path):
    """The ranks' shards of a main file, found through its manifest and read with plain torch.load."""
    meta = torch.load(main_path, weights_only=True)["desloc"]
    directory = os.path.join(main_path + ".shards", meta["save_id"])
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    return [torch.load(os.path.join(directory, e["file"]), weights_only=True) for e in manifest["shards"]]


def test_a_save_sends_nothing_right_after_a_full_round_and_exactly_what_differs_mid_period(tmp_path):
    # K_x = 4 and both Adam states every 4: step 4's round averages everything; step 6 lies between rounds
    probe = SaveProbe(str(tmp_path), at_steps=(4, 6))
    trainer(tmp_path, [probe], max_steps=6, param_sync_every=4, state_sync_every={"exp_avg": 4, "exp_avg_sq": 4},
            bucket_cap_mb=BUCKET_CAP_BYTES / 2**20).fit(FrozenStemNet(hidden=HIDDEN))
    records = [torch.load(tmp_path / f"probe{r}.pt") for r in (0, 1)]
    for rank, record in enumerate(records):
        after_round, mid = record["saves"][4], record["saves"][6]
        # right after the round: no checkpoint byte and no float tensor in any collective, only the save id
        # broadcast (int64 size, uint8 payload), the shard checksums' all_gather_object and the barrier
        assert after_round["ledger_bytes"] == 0 and after_round["ledger_rounds"] == 0
        floats = [c for c in after_round["calls"] if c[1] is not None and c[1].startswith("torch.float")]
        assert floats == [] and {c[0] for c in after_round["calls"]} <= {"broadcast", "all_gather_object", "barrier"}
        assert not any(c[0] in ("reduce", "all_reduce") for c in after_round["calls"])
        # mid-period: the trained parameters and both of their Adam states, float32; the frozen stem never
        expected = 3 * HEAD * FLOAT32
        reduces = [c for c in mid["calls"] if c[0] == "reduce"]
        assert mid["ledger_bytes"] == expected and mid["ledger_rounds"] == 1
        assert sum(c[2] for c in reduces) == expected  # counted at torch.distributed: the same bytes
        assert all(c[1] == "torch.float32" for c in reduces)
        # to rank 0 only, not to every rank; the one all_reduce is on_nonfinite's check before the save (the
        # ranks trained since the last round): one float32 flag per rank, category "control"
        assert [c for c in mid["calls"] if c[0] == "all_reduce"] == [("all_reduce", "torch.float32", 2 * FLOAT32)]
        assert len(reduces) > 2  # several buckets, so the pipeline of two in flight ran
        # the ledger counted every call it issued: the reduces, the check and the same control calls as the
        # other save
        assert mid["ledger_calls"] - after_round["ledger_calls"] == len(reduces) + 1

    # the main file of the mid-period save is the mean of the two ranks' own values, taken from the shards
    main = torch.load(tmp_path / "step6.ckpt", weights_only=True)
    a, b = shards_of(str(tmp_path / "step6.ckpt"))
    for name, value in main["state_dict"].items():
        if name.startswith("head."):
            assert not torch.equal(a["state_dict"][name], b["state_dict"][name]), name
            assert torch.equal(value, (a["state_dict"][name] + b["state_dict"][name]) / 2), name
        else:  # the frozen stem: rank 0's initial values, as both ranks still hold them
            assert torch.equal(value, a["state_dict"][name]) and torch.equal(value, b["state_dict"][name])
            assert torch.equal(value, records[0]["stem"][name.removeprefix("stem.")])
    state = main["optimizer_states"][0]["state"]
    assert sorted(state) == [2, 3, 4, 5]  # Adam holds no state for the stem (parameters 0 and 1)
    for index, per_param in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            mine, theirs = (s["optimizer_states"][0]["state"][index][key] for s in (a, b))
            assert torch.equal(per_param[key], (mine + theirs) / 2), (index, key)
    # right after the round the main file is what every rank holds
    main4 = torch.load(tmp_path / "step4.ckpt", weights_only=True)
    a4, b4 = shards_of(str(tmp_path / "step4.ckpt"))
    for name, value in main4["state_dict"].items():
        assert torch.equal(value, a4["state_dict"][name]) and torch.equal(value, b4["state_dict"][name])


def test_tied_weights_saved_inside_consensus_validation_resume_bit_for_bit(tmp_path):
    def fit(out, ckpt_path=None):
        L.seed_everything(0)
        saves = ModelCheckpoint(dirpath=str(out / "ck"), monitor="val_loss", save_top_k=-1, every_n_epochs=1,
                                save_on_train_epoch_end=False)  # saves in on_validation_end, before the restore
        trainer(out, [Recorder(str(out / "rec")), saves], max_epochs=2, param_sync_every=3,
                state_sync_every={"exp_avg": 6, "exp_avg_sq": 12}).fit(TiedLM(), ckpt_path=ckpt_path)
        return [torch.load(out / "rec" / f"rank{r}.pt") for r in (0, 1)]

    straight = fit(tmp_path / "straight")
    path = glob.glob(str(tmp_path / "straight" / "ck" / "epoch=0-step=5*.ckpt"))[0]
    main = torch.load(path, weights_only=True)
    shards = shards_of(path)
    # the shards hold each rank's own values at step 5 (between averages), under both names of the tied
    # weight, though the live parameters held the consensus during validation
    for r, shard in enumerate(shards):
        sd = shard["state_dict"]
        own = torch.cat([sd["tok_emb.weight"].reshape(-1), sd["mix.weight"].reshape(-1), sd["mix.bias"]])
        assert torch.equal(own, straight[r]["steps"][5])
        assert torch.equal(sd["head.weight"], sd["tok_emb.weight"])
    assert not torch.equal(shards[0]["state_dict"]["tok_emb.weight"], shards[1]["state_dict"]["tok_emb.weight"])
    for name in ("tok_emb.weight", "head.weight", "mix.weight", "mix.bias"):
        assert torch.equal(main["state_dict"][name], sum(s["state_dict"][name] for s in shards) / 2), name
    # validation had averaged the parameters already: the two saves (steps 5 and 10, both mid-period)
    # sent the two Adam states of the 3 parameters (the tied one once), float64, and no parameter
    unique = TiedLM.VOCAB * TiedLM.DIM + TiedLM.DIM * TiedLM.DIM + TiedLM.DIM
    assert straight[0]["ledger"]["checkpoint"] == 2 * (2 * unique * 8)

    resumed = fit(tmp_path / "resumed", ckpt_path=path)
    for r in (0, 1):
        assert resumed[r]["resume"] == "local"
        assert sorted(resumed[r]["steps"]) == list(range(6, 11))
        for step in range(6, 11):
            assert torch.equal(resumed[r]["steps"][step], straight[r]["steps"][step]), (r, step)
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed[r]["end"][key], straight[r]["end"][key]), (r, key)
        # the saved ledger includes the bytes of the save it was written by, as the run going on has them
        assert resumed[r]["ledger"]["checkpoint"] == straight[r]["ledger"]["checkpoint"]


def test_the_outer_step_peeked_slice_by_slice_gives_the_bits_of_the_live_step():
    torch.manual_seed(0)
    sizes = (7, 33, 1, 129, 64)  # slices that start and end anywhere in the vectorised loops
    for momentum, nesterov in ((0.9, True), (0.9, False), (0.0, False)):
        outer = OuterOptimizer(lr=0.7, momentum=momentum, nesterov=nesterov)
        params = [torch.randn(n) for n in sizes]
        outer.prime(params)
        for _round in range(3):  # the first round starts the momentum buffer, later ones update it
            means = [p + 0.1 * torch.randn_like(p) for p in params]
            peeked, offset = [], 0
            for m in means:
                peeked.append(outer.peek(m, offset))
                offset += m.numel()
            before = outer.snapshot.flat.clone()
            for p, m in zip(params, means):
                p.copy_(m)
            outer.step(params)  # the live step, on the whole flat vector
            assert torch.equal(torch.cat([x for x, _ in peeked]), outer.snapshot.flat)
            assert torch.equal(torch.cat([x for x, _ in peeked]), torch.cat(params))
            if momentum:
                assert torch.equal(torch.cat([b for _, b in peeked]), outer.momentum_buffer)
            assert not torch.equal(before, outer.snapshot.flat)


# ----------------------------------------------------------------------------------------- hierarchical groups
def _hierarchical_save_worker(rank, world, out_dir):
    from lightning_desloc import checkpoint as ckpt
    from lightning_desloc.config import DeslocConfig
    from lightning_desloc.sync import DeslocSync

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Linear(5, 3).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    # groups {0, 1} and {2, 3} all-reduce their gradients every step (group_param_sync_every=1), so inside a
    # group the ranks are equal; across groups only the outermost round at step 4 averages
    core = DeslocSync(DeslocConfig.from_arguments(
        param_sync_every=4, state_sync_every={"exp_avg": 4, "exp_avg_sq": 4}, group_size=2))
    core.setup_groups()
    core.attach([optimizer])
    data = torch.Generator().manual_seed(50 + rank)
    saves = {}
    for step in range(1, 5):
        x = torch.randn(8, 5, generator=data, dtype=torch.float64)

        def closure():
            optimizer.zero_grad()
            loss = (model(x) - (1 + rank)).pow(2).mean()
            loss.backward()
            return loss

        index = core.begin_step(optimizer)
        optimizer.step(core.wrap_closure(closure, optimizer))
        core.after_step(index, optimizer)
        if step in (2, 4):
            before = core.ledger.bytes.get("checkpoint", 0), core.group_level.ledger.bytes.get("checkpoint", 0)
            path = os.path.join(out_dir, f"step{step}.ckpt")
            ckpt.save(core, {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()],
                             "global_step": step}, path, modules=[model])
            saves[step] = (core.ledger.bytes.get("checkpoint", 0) - before[0],
                           core.group_level.ledger.bytes.get("checkpoint", 0) - before[1])
    torch.save(saves, os.path.join(out_dir, f"saves{rank}.pt"))


def test_with_hierarchical_groups_the_main_file_is_the_mean_over_every_rank(tmp_path):
    run_on_processes(_hierarchical_save_worker, 4, str(tmp_path))
    n_params = 5 * 3 + 3
    for rank in range(4):
        saves = torch.load(tmp_path / f"saves{rank}.pt")
        # step 2: the groups differ, so the parameters and both states go to rank 0 over the world group
        # (never through the group level's ledger); step 4: the outermost round just averaged everything
        assert saves[2] == (3 * n_params * 8, 0)
        assert saves[4] == (0, 0)
    main = torch.load(tmp_path / "step2.ckpt", weights_only=True)
    shards = shards_of(str(tmp_path / "step2.ckpt"))
    weights = [s["state_dict"]["weight"] for s in shards]
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[2], weights[3])
    assert not torch.equal(weights[0], weights[2])
    for name in ("weight", "bias"):
        expected = sum(s["state_dict"][name] for s in shards) / 4  # not the mean of rank 0's group
        # to 1e-14: gloo's reduce may add the 4 ranks' values in another order than this sum
        torch.testing.assert_close(main["state_dict"][name], expected, rtol=1e-14, atol=1e-15)
    for key in ("exp_avg", "exp_avg_sq"):
        expected = sum(s["optimizer_states"][0]["state"][0][key] for s in shards) / 4
        torch.testing.assert_close(main["optimizer_states"][0]["state"][0][key], expected, rtol=1e-14, atol=1e-15)
