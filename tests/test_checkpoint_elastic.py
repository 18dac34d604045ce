"""kill -9 under torchrun: the group restarts, resumes from ``last.ckpt`` with no user action, and ends
exactly where a run resumed from the same checkpoint without a crash ends.

Both runs are real torchrun launches of ``tests/elastic_worker.py`` (2 gloo processes, float64, Adam,
K_x=3, exp_avg every 6 and exp_avg_sq every 12 steps, 4 epochs of 5 steps, a checkpoint after every
epoch). In the first, rank 1 of the first attempt kills itself with SIGKILL before optimizer step 13;
torchrun (``--max-restarts=2``) restarts both workers and they resume from ``last.ckpt``, a link to the
epoch-1 checkpoint (step 10). The second starts from a copy of that checkpoint (main file and shards)
and never crashes. The final consensus (``final.ckpt``), the last epoch checkpoint and every rank's
parameters after every step must be equal bit for bit.
"""

import json
import os
import shutil
import subprocess
import sys

import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elastic_worker.py")
TIMEOUT_S = 240


def torchrun(out, *args, max_restarts=0):
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        f"--max-restarts={max_restarts}", "--monitor-interval=0.1", WORKER, "--out", str(out), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=str(out.parent), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def tensors_equal(a, b, where=""):
    """Recursive bit-exact comparison of two checkpoint structures (tensors, dicts, lists, plain values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            tensors_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kill_9_under_torchrun_restarts_and_matches_a_resume_without_crash(tmp_path):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    log = torchrun(crashed, "--kill-at-step", "12", max_restarts=2)

    # what happened: rank 1 died by SIGKILL in attempt 0, the group restarted and resumed locally
    assert (crashed / "killed.txt").read_text() == "12"
    assert "exitcode: -9" in log
    attempts = (crashed / "attempts.txt").read_text().split()
    assert {"attempt=0", "attempt=1"} <= set(attempts[0::2])
    info = json.loads((crashed / "attempt.json").read_text())
    assert info["restart_count"] >= 1
    assert info["resume"] == "local"
    assert os.path.basename(info["resumed_from"]) == "epoch=1-step=10.ckpt"
    assert "LOCAL path" in log

    # an independent run from a copy of the checkpoint the restarted group resumed from
    clean = tmp_path / "clean"
    (clean / "from").mkdir(parents=True)
    start = clean / "from" / "epoch=1-step=10.ckpt"
    shutil.copy2(info["resumed_from"], start)
    shutil.copytree(info["resumed_from"] + ".shards", str(start) + ".shards")
    log2 = torchrun(clean, "--ckpt", str(start))
    assert not (clean / "killed.txt").exists()
    info2 = json.loads((clean / "attempt.json").read_text())
    assert info2 == {"restart_count": 0, "resume": "local", "resumed_from": str(start)}, log2[-3000:]

    # the final consensus: parameters, every optimizer state (averaged and not) and the schedule position
    a = torch.load(crashed / "final.ckpt", weights_only=True)
    b = torch.load(clean / "final.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    tensors_equal(a["state_dict"], b["state_dict"], "state_dict")
    tensors_equal(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert a["desloc"]["optimizer_steps"] == b["desloc"]["optimizer_steps"] == [20]
    # the consensus is not trivially some rank's copy: step 20 is between exp_avg_sq syncs (every 12)
    shards = [torch.load(p, weights_only=True) for p in sorted((crashed / "final.ckpt.shards").glob("*/rank-*.pt"))]
    assert len(shards) == 2
    sq = [s["optimizer_states"][0]["state"][0]["exp_avg_sq"] for s in shards]
    assert not torch.equal(sq[0], sq[1])
    assert torch.equal(a["optimizer_states"][0]["state"][0]["exp_avg_sq"], (sq[0] + sq[1]) / 2)

    # the last epoch checkpoint and each rank's parameters after every step since the resume
    tensors_equal(
        torch.load(crashed / "ckpts" / "epoch=3-step=20.ckpt", weights_only=True)["state_dict"],
        torch.load(clean / "ckpts" / "epoch=3-step=20.ckpt", weights_only=True)["state_dict"],
        "epoch=3",
    )
    for rank in (0, 1):
        ra = torch.load(crashed / "rec" / f"rank{rank}.pt")
        rb = torch.load(clean / "rec" / f"rank{rank}.pt")
        assert sorted(ra["steps"]) == sorted(rb["steps"]) == list(range(11, 21))
        tensors_equal(ra["steps"], rb["steps"], f"rank {rank} steps")
        tensors_equal(ra["end"], rb["end"], f"rank {rank} end")
