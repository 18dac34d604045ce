"""A dead rank ends its peers within ``peer_timeout_s`` instead of the process group's timeout (issue 15).

The liveness watch (``lightning_desloc/liveness.py``) on real stores and real processes:

* the watch itself, in this process over a real ``TCPStore``: a silent peer is named, a peer that said
  ``left`` is not, a peer that never beat is lost, a frozen store host is seen although the requests to it
  block, and a host that left before its store went away is the end of a run, not a loss;
* two-rank fits: a healthy fit with ``peer_timeout_s=1`` and one rank 4 s behind inside a round has no false
  alarm (and the heartbeats' store requests are counted); ``peer_timeout_s=None`` starts no thread; with
  Fabric (no teardown) a rank that finishes long before the other is not taken for dead;
* faults from ``tests/faults.py`` on one process per "machine" (``tests/fault_worker.py``, Lightning's own
  multi-node mode, no launcher watching the processes): ``kill -9`` of rank 1 in a long local phase, rank 1's
  machine lost (``vanish``) mid-round, rank 0's machine (the store's host) lost, and a plain ``kill -9``
  mid-round (gloo notices that one at once on one machine). The time from the kill to the survivor's exit
  is measured;
* under torchrun (``--max-restarts=1``): a ``kill -9`` mid-round restarts the group, which resumes from the
  last checkpoint and ends bit for bit where a crash-free run resumed from the same checkpoint ends; a
  ``kill -9`` of rank 0 while it writes ``last.ckpt`` leaves the previous ``last.ckpt`` intact, and that is
  what the restarted group resumes from; with two agents ("machines"), a lost machine mid-round is noticed
  by rank 0's watch alone, and a replacement agent joins the restarted group.

The measured times are printed as ``MEASURED ...`` lines (``pytest -s``); docs/checkpointing.md quotes them.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from faults import Fault, read_record
from helpers import START_METHOD, Regression, free_port, quiet_trainer
from lightning_desloc import DeslocStrategy, liveness
from lightning_desloc.config import DeslocConfig
from lightning_desloc.liveness import PEER_LOST_EXIT_CODE, PeerLiveness, heartbeat_period

TESTS = Path(__file__).parent
WORKER = str(TESTS / "fault_worker.py")
#: the tests' peer timeout, seconds
PEER_TIMEOUT_S = 5.0
HEARTBEAT_S = heartbeat_period(PEER_TIMEOUT_S)
#: latest exit after a death: the last heartbeat is seen up to one heartbeat late and the watchdog looks
#: twice per heartbeat; 2 s more for a loaded 2-core machine and the exit itself
DETECTION_BOUND_S = PEER_TIMEOUT_S + 2 * HEARTBEAT_S + 2.0


def measured(what: str, **values) -> None:
    print(f"MEASURED {what}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in values.items()))


# ----------------------------------------------------------------------------------------- the watch itself
def test_peer_timeout_is_validated_and_sets_the_heartbeat():
    assert DeslocConfig().peer_timeout_s == 30.0
    assert DeslocConfig(peer_timeout_s=None).peer_timeout_s is None
    assert heartbeat_period(30.0) == 5.0
    for bad in (0, -1.0, float("nan"), float("inf"), "30", True):
        with pytest.raises(ValueError, match="peer_timeout_s must be a positive, finite number of seconds or None"):
            DeslocConfig(peer_timeout_s=bad)
    assert DeslocStrategy(peer_timeout_s=7.5).config.peer_timeout_s == 7.5
    assert "peer_timeout_s" in DeslocStrategy.__doc__


def test_a_peer_is_judged_only_while_the_store_answers():
    # the watchdog's judgement on the heartbeat thread's last view, by hand (timeout 6 s, heartbeat 1 s):
    # rank 0's counter last moved 7 s ago. With the store answering 0.5 s ago that is rank 0's loss; with
    # the store silent for 5 s (a frozen store host stops both) nothing is decided until the store itself
    # has been silent for the timeout, and then the store is named
    watch = PeerLiveness(None, 1, 2, 6.0)
    now = 1000.0
    watch._seen[0] = liveness._Seen(value=b"3", changed_at=now - 7.0)
    watch._last_answer = now - 0.5
    assert watch._judge(now) == liveness.PeerLoss(1, {0: 7.0}, None, 6.0)
    watch._last_answer = now - 5.0
    assert watch._judge(now) is None
    loss = watch._judge(now + 1.5)
    assert loss is not None and loss.store_silent_s == 6.5 and loss.silent == {0: 8.5}


class Losses:
    """Collects the losses one watch reports (in place of ending the process)."""

    def __init__(self):
        self.found, self.event = [], threading.Event()

    def __call__(self, loss):
        self.found.append((time.monotonic(), loss))
        self.event.set()


def _tcp_store(port, master=False):
    return dist.TCPStore("127.0.0.1", port, is_master=master, wait_for_workers=False)


def test_a_silent_peer_is_named_and_a_peer_that_left_is_not():
    timeout = 1.0
    port = free_port()
    host = _tcp_store(port, master=True)
    losses = [Losses() for _ in range(3)]
    watches = [PeerLiveness(_tcp_store(port), r, 3, timeout, on_loss=losses[r]).start() for r in range(3)]
    try:
        time.sleep(3 * timeout)  # three timeouts of healthy heartbeats: no alarm anywhere
        assert not any(lo.found for lo in losses)
        watches[1].stop(left=True)  # finished normally
        stopped = time.monotonic()
        watches[2].stop(left=False)  # went down on an error: silent
        assert losses[0].event.wait(timeout + 2.0)
        found_at, loss = losses[0].found[0]
        assert sorted(loss.silent) == [2] and loss.store_silent_s is None
        assert loss.silent[2] > timeout
        delay = found_at - stopped
        assert timeout - heartbeat_period(timeout) <= delay <= timeout + 2 * heartbeat_period(timeout) + 0.5, delay
        assert "rank 2 sent no heartbeat" in loss.describe() and "[rank 0]" in loss.describe()
        measured("in-process watch, silent peer", peer_timeout_s=timeout, stop_to_loss_s=delay)
        assert watches[0].stats().peers_left == [1]
    finally:
        for w in watches:
            w.stop()
        del host


def test_a_peer_that_never_beats_is_lost_after_the_timeout():
    timeout = 1.0
    port = free_port()
    host = _tcp_store(port, master=True)
    losses = Losses()
    started = time.monotonic()
    watch = PeerLiveness(_tcp_store(port), 0, 2, timeout, on_loss=losses).start()
    try:
        assert losses.event.wait(timeout + 2.0)
        found_at, loss = losses.found[0]
        assert sorted(loss.silent) == [1]
        assert found_at - started >= timeout
    finally:
        watch.stop()
        del host


HOST = textwrap.dedent("""
    import importlib.util, sys, time
    import torch.distributed as dist
    port, timeout, mode, module = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
    spec = importlib.util.spec_from_file_location("liveness", module)  # the module alone, without Lightning
    liveness = sys.modules["liveness"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(liveness)
    PeerLiveness = liveness.PeerLiveness
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    watch = PeerLiveness(dist.TCPStore("127.0.0.1", port), 0, 2, timeout, on_loss=print).start()
    print("ready", flush=True)
    if mode == "leave":
        time.sleep(3 * timeout)
        watch.stop(left=True)
        time.sleep(1.0)  # as the exit hook's wait for the other ranks: they read "left" before the store goes
        sys.exit(0)  # the store goes with this process
    time.sleep(120)
""")


@pytest.mark.parametrize("host_does", ["freeze", "leave"])
def test_the_store_host_frozen_is_a_loss_and_the_store_host_leaving_is_not(tmp_path, host_does):
    """Rank 0 hosts the store. Frozen (SIGSTOP: requests to it block with no bound), rank 1's watchdog
    still judges within the timeout; when rank 0 said ``left`` and then exited, the store's end is no loss."""
    timeout = 1.0
    port = free_port()
    script = tmp_path / "host.py"
    script.write_text(HOST)
    host = subprocess.Popen([sys.executable, str(script), str(port), str(timeout),
                             "leave" if host_does == "leave" else "stay", liveness.__file__],
                            stdout=subprocess.PIPE, text=True)
    watch = None
    try:
        assert host.stdout.readline().strip() == "ready"
        losses = Losses()
        watch = PeerLiveness(_tcp_store(port), 1, 2, timeout, on_loss=losses).start()
        time.sleep(2 * timeout)
        assert not losses.found
        if host_does == "freeze":
            os.kill(host.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            assert losses.event.wait(timeout + 2.0)
            found_at, loss = losses.found[0]
            assert loss.store_silent_s is not None and loss.store_silent_s > timeout
            assert "rendezvous store" in loss.describe() and "rank 0" in loss.describe()
            measured("in-process watch, frozen store host", peer_timeout_s=timeout, freeze_to_loss_s=found_at - frozen)
        else:
            assert host.wait(10) == 0
            time.sleep(2 * timeout)  # the store is gone since the host left: the watch sees errors, no loss
            assert not losses.found, losses.found
            assert watch.stats().store_errors > 0 and watch.stats().peers_left == [0]
    finally:
        host.kill()
        host.wait()
        if watch is not None:
            watch.stop()


# ----------------------------------------------------------------------------------------- two-rank fits
class ThreadProbe(Callback):
    """Records, per rank, the liveness threads alive in training and after teardown, and the watch's counts."""

    def __init__(self, out_dir, slow_rank=None, slow_batch=None, slow_s=0.0):
        self.out_dir, self.slow_rank, self.slow_batch, self.slow_s = out_dir, slow_rank, slow_batch, slow_s
        self.record = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.record["threads_in_training"] = list(liveness.thread_names())
        if trainer.global_rank == self.slow_rank and batch_idx == self.slow_batch:
            time.sleep(self.slow_s)  # this rank arrives that much later at the next round

    def on_train_end(self, trainer, pl_module):
        watch = liveness.active()
        self.record["stats"] = None if watch is None else vars(watch.stats()) | {
            "store_requests_per_s": watch.stats().store_requests_per_s, "heartbeat_s": watch.heartbeat_s}

    def on_fit_end(self, trainer, pl_module):  # after the strategy's teardown
        self.record["threads_after_teardown"] = list(liveness.thread_names())
        torch.save(self.record, os.path.join(self.out_dir, f"probe{trainer.global_rank}.pt"))


def test_a_healthy_fit_with_a_rank_far_behind_in_a_round_has_no_false_alarm(tmp_path):
    """peer_timeout_s=1, and rank 1 arrives 4 s late at the round after step 8: rank 0 waits in the
    all-reduce for four timeouts, and the heartbeats (a thread of each process) go on meanwhile."""
    probe = ThreadProbe(str(tmp_path), slow_rank=1, slow_batch=5, slow_s=4.0)
    trainer = quiet_trainer(strategy=DeslocStrategy(param_sync_every=4, peer_timeout_s=1.0, start_method=START_METHOD),
                            max_steps=16, limit_val_batches=0, enable_checkpointing=True,
                            callbacks=[probe, ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=4,
                                                              save_top_k=-1)])
    started = time.monotonic()
    trainer.fit(Regression(n_batches=16))
    assert trainer.strategy.optimizer_steps == [16]  # brought back from rank 0 by the launcher
    for rank in (0, 1):
        record = torch.load(tmp_path / f"probe{rank}.pt")
        assert sorted(record["threads_in_training"]) == ["desloc-heartbeat", "desloc-watchdog"]
        assert record["threads_after_teardown"] == []  # stopped at teardown
        stats = record["stats"]
        assert stats["store_errors"] == 0
        # a heartbeat is a set and a multi_get: two store requests per heartbeat_s (plus a check or two while
        # the peer's key was not there yet)
        assert stats["store_requests"] <= 2 * stats["heartbeats"] + 4
        measured(f"healthy fit, rank {rank}", peer_timeout_s=1.0, heartbeat_s=stats["heartbeat_s"],
                 heartbeats=stats["heartbeats"], store_requests=stats["store_requests"],
                 store_requests_per_s=stats["store_requests_per_s"], watched_s=stats["elapsed_s"])
    measured("healthy fit", wall_s=time.monotonic() - started)


def test_peer_timeout_none_starts_no_thread(tmp_path):
    probe = ThreadProbe(str(tmp_path))
    trainer = quiet_trainer(strategy=DeslocStrategy(param_sync_every=2, peer_timeout_s=None, start_method=START_METHOD),
                            max_steps=2, limit_val_batches=0, callbacks=[probe])
    trainer.fit(Regression(n_batches=2))
    for rank in (0, 1):
        record = torch.load(tmp_path / f"probe{rank}.pt")
        assert record["threads_in_training"] == [] and record["stats"] is None


FABRIC = textwrap.dedent("""
    import os, sys, time
    import lightning as L, torch
    sys.path.insert(0, {tests!r})
    from lightning_desloc import DeslocFabricStrategy, liveness

    late_rank = int(sys.argv[1])
    strategy = DeslocFabricStrategy(param_sync_every=2, peer_timeout_s=1.0)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    for _ in range(6):
        fabric.backward(model(torch.randn(8, 4)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    assert liveness.thread_names(), "the watch runs during the loop"
    fabric.strategy.reach_consensus()
    if fabric.global_rank == late_rank:
        time.sleep(4.0)  # four timeouts of work alone, while the other rank is already in its exit hook
    print(f"rank {{fabric.global_rank}} done", flush=True)
""")


@pytest.mark.parametrize("late_rank", [0, 1])
def test_fabric_a_rank_that_ends_long_before_the_other_is_not_taken_for_dead(tmp_path, late_rank):
    """Fabric has no teardown: the exit hook stops the watch, says ``left``, then waits for the other rank."""
    script = tmp_path / "fabric_fit.py"
    script.write_text(FABRIC.format(tests=str(TESTS)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), str(late_rank)], env=env, capture_output=True, text=True,
                          timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "rank 0 done" in output and "rank 1 done" in output
    assert "DES-LOC liveness" not in output


# ------------------------------------------------------------------------------ faults, one process per machine
def _machines(out: Path, fault: Fault, *worker_args: str) -> list[subprocess.Popen]:
    """Rank r of 2 as its own "machine": Lightning's multi-node mode (NODE_RANK), no launcher watching it."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank), LOCAL_RANK="0",
                   PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **fault.to_env())
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, "--out", str(out), "--devices", "1", "--num-nodes", "2",
                                       "--no-checkpoints", *worker_args],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _exit_time(proc: subprocess.Popen, limit_s: float) -> float:
    """``time.time()`` at which ``proc`` ended (polled every 10 ms), or an AssertionError after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"still running after {limit_s} s"
        time.sleep(0.01)
    return time.time()


def _end(procs, record):
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if record and record.get("holder_pid"):
        try:
            os.kill(record["holder_pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("dead, phase, action, k_x, step, message", [
    # a long local phase: no collective would notice for ~20 s
    (1, "local", "kill", 1000, 3, "[rank 0] DES-LOC liveness: rank 1 sent no heartbeat for"),
    # a lost machine mid-round: rank 0 waits in the all-reduce, and sees neither a close nor a reset
    (1, "round", "vanish", 4, 4, "[rank 0] DES-LOC liveness: rank 1 sent no heartbeat for"),
    # the machine of rank 0, which hosts the store, lost in a local phase: rank 1's store requests block
    (0, "local", "vanish", 1000, 3, "[rank 1] DES-LOC liveness: the rendezvous store (hosted by rank 0"),
], ids=["kill-rank1-local", "vanish-rank1-round", "vanish-rank0-local"])
def test_the_survivor_exits_within_the_peer_timeout_when_its_peer_dies(tmp_path, dead, phase, action, k_x, step,
                                                                       message):
    survivor = 1 - dead
    record_path = tmp_path / "fired.json"
    fault = Fault(rank=dead, step=step, phase=phase, action=action, record=str(record_path), hold_s=60)
    procs = _machines(tmp_path, fault, "--n-batches", "400", "--max-epochs", "1", "--param-sync-every", str(k_x),
                      "--step-sleep", "0.05", "--peer-timeout", str(PEER_TIMEOUT_S))
    record = None
    try:
        ended_at = _exit_time(procs[survivor], 120)
        record = read_record(record_path)
        log = (tmp_path / f"rank{survivor}.log").read_text()
        assert record is not None, log[-3000:]
        assert procs[survivor].returncode == PEER_LOST_EXIT_CODE, log[-3000:]
        assert message in log, log[-3000:]
        detection = ended_at - record["time"]
        # not before the timeout (it is the watch, not a collective's error), and not much later
        assert PEER_TIMEOUT_S - HEARTBEAT_S <= detection <= DETECTION_BOUND_S, detection
        measured(f"kill -> rank {survivor} exit, {action} of rank {dead} in {phase} phase",
                 peer_timeout_s=PEER_TIMEOUT_S, detection_s=detection)
    finally:
        _end(procs, record)


def test_a_plain_kill_mid_round_on_one_machine_ends_rank_0_at_once(tmp_path):
    """On one machine the kernel closes the dead process's sockets: gloo fails rank 0's all-reduce at once
    ("Connection closed by peer" or "... reset by peer"), before the watch; rank 0 exits with Lightning's error."""
    record_path = tmp_path / "fired.json"
    fault = Fault(rank=1, step=4, phase="round", action="kill", record=str(record_path))
    procs = _machines(tmp_path, fault, "--n-batches", "400", "--max-epochs", "1", "--param-sync-every", "4",
                      "--step-sleep", "0.05", "--peer-timeout", str(PEER_TIMEOUT_S))
    record = None
    try:
        ended_at = _exit_time(procs[0], 120)
        record = read_record(record_path)
        log0 = (tmp_path / "rank0.log").read_text()
        assert record is not None and procs[0].returncode not in (0, PEER_LOST_EXIT_CODE), log0[-3000:]
        assert "Connection closed by peer" in log0 or "Connection reset by peer" in log0, log0[-3000:]
        detection = ended_at - record["time"]
        assert detection < PEER_TIMEOUT_S, detection
        measured("kill -> rank 0 exit, kill in round phase (gloo's error)", detection_s=detection)
    finally:
        _end(procs, record)


# ------------------------------------------------------------------------------ under torchrun, with a restart
def _torchrun(out: Path, fault: Fault = None, *args: str, max_restarts: int = 0) -> str:
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if fault is not None:
        env.update(fault.to_env())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.1", WORKER, "--out", str(out),
           "--peer-timeout", str(PEER_TIMEOUT_S), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=str(out.parent), env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _equal(a, b, where=""):
    """Bit-exact comparison of nested checkpoint structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _restart_times(out: Path, record: dict) -> dict:
    """Seconds from the kill to the restarted attempt's resume (``on_train_start``) and first step, both ranks."""
    later = [e for e in _events(out) if e["time"] > record["time"]]
    resumed = [e["time"] for e in later if e["event"] == "resumed"]
    stepped = [e["time"] for e in later if e["event"] == "step"]
    assert len(resumed) == len(stepped) == 2, later
    return {"kill_to_resumed_s": max(resumed) - record["time"], "kill_to_first_step_s": max(stepped) - record["time"]}


def test_kill_mid_round_under_torchrun_restarts_and_matches_a_resume_without_crash(tmp_path):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    record_path = crashed / "fired.json"
    # K_x=3: the parameter round of step 12; the checkpoints are at steps 5, 10, 15, 20
    fault = Fault(rank=1, step=12, phase="round", action="kill", record=str(record_path))
    log = _torchrun(crashed, fault, "--save-last", "link", max_restarts=1)
    record = read_record(record_path)
    assert record is not None and record["global_step"] == 11  # inside optimizer step 12, before it counts
    assert "exitcode: -9" in log
    info = json.loads((crashed / "attempt.json").read_text())
    assert info["restart_count"] == 1 and info["resume"] == "local"
    assert os.path.basename(info["resumed_from"]) == "epoch=1-step=10.ckpt"
    measured("torchrun, kill -9 mid-round", **_restart_times(crashed, record))

    clean = tmp_path / "clean"
    (clean / "from").mkdir(parents=True)
    start = clean / "from" / "epoch=1-step=10.ckpt"
    shutil.copy2(info["resumed_from"], start)
    shutil.copytree(info["resumed_from"] + ".shards", str(start) + ".shards")
    _torchrun(clean, None, "--ckpt", str(start), "--save-last", "link")
    assert json.loads((clean / "attempt.json").read_text())["resume"] == "local"

    a = torch.load(crashed / "final.ckpt", weights_only=True)
    b = torch.load(clean / "final.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    _equal(a["state_dict"], b["state_dict"], "state_dict")
    _equal(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    for rank in (0, 1):
        ra, rb = torch.load(crashed / "rec" / f"rank{rank}.pt"), torch.load(clean / "rec" / f"rank{rank}.pt")
        assert sorted(ra["steps"]) == sorted(rb["steps"]) == list(range(11, 21))
        _equal(ra["steps"], rb["steps"], f"rank {rank} steps")
        _equal(ra["end"], rb["end"], f"rank {rank} end")


def test_kill_while_last_ckpt_is_written_leaves_the_previous_one_and_the_restart_uses_it(tmp_path):
    """Rank 0 is killed while it writes the main file of ``last.ckpt`` at step 15 (after
    ``epoch=2-step=15.ckpt`` was written): the restarted group resumes from the ``last.ckpt`` of step 10,
    the very file that was there before the interrupted write, on the local path."""
    out = tmp_path / "run"
    out.mkdir()
    record_path = out / "fired.json"
    fault = Fault(rank=0, step=15, phase="save", action="kill", point="write", path_endswith="last.ckpt",
                  record=str(record_path))
    log = _torchrun(out, fault, "--save-last", "true", max_restarts=1)
    record = read_record(record_path)
    assert record is not None and record["global_step"] == 15 and record["path"].endswith("last.ckpt"), log[-3000:]
    assert record["replaced_sha256"] is not None
    resumed = [e for e in _events(out) if e["event"] == "resumed"]
    assert len(resumed) == 2 and {e["rank"] for e in resumed} == {0, 1}
    for e in resumed:
        assert e["step"] == 10 and e["path"] == "local" and e["file"].endswith("last.ckpt")
        assert e["sha256"] == record["replaced_sha256"]  # byte for byte the file the crash did not replace
    info = json.loads((out / "attempt.json").read_text())
    assert info["restart_count"] == 1
    assert torch.load(out / "final.ckpt", weights_only=True)["global_step"] == 20
    measured("torchrun, kill -9 in a save", **_restart_times(out, record))


def _agent(out: Path, port: int, fault: Fault, log_name: str) -> subprocess.Popen:
    """One torchrun agent of a 2-machine job (c10d rendezvous on this machine), one worker."""
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               **fault.to_env())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lost-host",
           "--rdzv-conf=keep_alive_interval=1,keep_alive_max_attempt=2", "--max-restarts=1", "--monitor-interval=0.1",
           WORKER, "--out", str(out), "--peer-timeout", str(PEER_TIMEOUT_S), "--save-last", "link"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=str(out.parent), env=env, stdout=open(out.parent / log_name, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)  # exited, not reaped
    except FileNotFoundError:
        return True


def test_a_lost_machine_under_torchrun_ends_the_survivor_and_a_replacement_resumes(tmp_path):
    """Two torchrun agents, one worker each ("machines"). Mid-round, machine 1 is lost: its worker and its
    agent die while the worker's sockets stay open (``lose_host``), so neither gloo nor agent 0 can tell.
    Rank 0's watch ends it (exit code 75) within the timeout; agent 0 restarts its worker and waits at the
    rendezvous; a replacement agent for machine 1 (the scheduler's job, started here once rank 0 is gone)
    joins, and both resume from the last checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    record_path = out / "fired.json"
    fault = Fault(rank=1, step=12, phase="round", action="lose_host", record=str(record_path), hold_s=90)
    port = free_port()
    agents = [_agent(out, port, fault, "agent0.log")]
    time.sleep(1.0)  # agent 0 hosts the rendezvous store, as the first machine of a job does
    agents.append(_agent(out, port, fault, "agent1.log"))
    record = None
    try:
        deadline = time.monotonic() + 120
        while (record := read_record(record_path)) is None:
            assert time.monotonic() < deadline and agents[0].poll() is None, "the fault never fired"
            time.sleep(0.05)
        survivor = next(e["pid"] for e in _events(out) if e["rank"] == 0)
        while not _gone(survivor):
            assert time.monotonic() < deadline, "rank 0 still runs"
            time.sleep(0.01)
        detection = time.time() - record["time"]
        assert PEER_TIMEOUT_S - HEARTBEAT_S <= detection <= DETECTION_BOUND_S, detection
        replaced_at = time.time()
        agents.append(_agent(out, port, fault, "agent1-replacement.log"))
        assert agents[0].wait(120) == 0 and agents[2].wait(120) == 0
        log0 = (tmp_path / "agent0.log").read_text()
        assert "[rank 0] DES-LOC liveness: rank 1 sent no heartbeat" in log0 and "exitcode: 75" in log0, log0[-4000:]
        info = json.loads((out / "attempt.json").read_text())
        assert info["restart_count"] == 1 and info["resume"] == "local"  # agent 0's count: it restarted once
        assert os.path.basename(info["resumed_from"]) == "epoch=1-step=10.ckpt"
        assert torch.load(out / "final.ckpt", weights_only=True)["global_step"] == 20
        stepped = max(e["time"] for e in _events(out) if e["event"] == "step" and e["time"] > replaced_at)
        measured("torchrun, lost machine mid-round", detection_s=detection,
                 replacement_to_first_step_s=stepped - replaced_at, kill_to_first_step_s=stepped - record["time"])
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        if record and record.get("holder_pid"):
            try:
                os.kill(record["holder_pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
