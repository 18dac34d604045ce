"""Local steps never wait: with a default Trainer (checkpointing, progress bar, a logger) a step that
averages nothing issues no torch.distributed collective, counted at torch.distributed itself; a SIGTERM
rides on the averaging rounds, stops every rank at the same step (a real signal to one rank), and the
run resumes from its checkpoint."""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from helpers import START_METHOD, Regression, free_port, quiet_trainer
from lightning_desloc import DeslocStrategy

#: every collective of torch.distributed's public API a strategy or Lightning could issue
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast_object_list", "gather", "gather_object", "scatter", "scatter_object_list", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier",
               "monitored_barrier", "send", "recv", "isend", "irecv")


class CollectiveCounter(Callback):
    """Wraps torch.distributed's collectives in this process (they still run) and tags every call with
    ``("in", b)`` inside batch ``b`` or ``("after", b)`` between the end of batch ``b`` and the start of the
    next one (where Lightning's loop broadcasts its SIGTERM flag, and epoch ends save checkpoints)."""

    def __init__(self, out_dir):
        self.out_dir, self.batch, self.calls, self._depth = out_dir, ("after", -1), [], 0
        self._original = {}

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:  # all_gather_object calls all_gather: count the outer call only
                self.calls.append((self.batch, name))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def on_train_start(self, trainer, pl_module):
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._original[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._original[name]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = ("in", batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch = ("after", batch_idx)

    def on_train_end(self, trainer, pl_module):
        for name, fn in self._original.items():
            setattr(dist, name, fn)
        ledger = trainer.strategy.ledger
        record = {"calls": self.calls, "ledger_calls": ledger.calls, "ledger_rounds": ledger.rounds}
        torch.save(record, os.path.join(self.out_dir, f"calls{trainer.global_rank}.pt"))


class LogsWithoutSync(Regression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True)  # each rank's own value: no reduction
        return loss


def test_a_default_trainer_issues_no_collective_on_local_steps(tmp_path):
    k_x, steps = 8, 40
    trainer = quiet_trainer(
        strategy=DeslocStrategy(param_sync_every=k_x, start_method=START_METHOD),  # states every 24 and 48
        max_steps=steps, limit_val_batches=0, default_root_dir=str(tmp_path),
        logger=True, enable_checkpointing=True, enable_progress_bar=True, log_every_n_steps=1,
        callbacks=[CollectiveCounter(str(tmp_path))],
    )
    trainer.fit(LogsWithoutSync(n_batches=steps))
    for rank in (0, 1):
        record = torch.load(tmp_path / f"calls{rank}.pt")
        in_batches = [(b, name) for (where, b), name in record["calls"] if where == "in"]
        between = {b for (where, b), _ in record["calls"] if where == "after"}
        # batch b ends with optimizer step s = b + 1; only the steps with s % K_x == 0 average (exp_avg at
        # 24 rides on the parameter round): one all_reduce each (params, states and the signals are float32,
        # one bucket)
        assert in_batches == [(s - 1, "all_reduce") for s in range(k_x, steps + 1, k_x)], in_batches
        # between batches nothing, until the end of training (its checkpoint save)
        assert between <= {steps - 1}, sorted(between)
        # the ledger counts the calls it issued, and they are all there is in the batches
        assert record["ledger_calls"] >= len(in_batches)


FIT = textwrap.dedent("""
    import json, os, sys, time
    import lightning as L, torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    sys.path.insert(0, {tests!r})
    from lightning_desloc import DeslocStrategy
    from helpers import Regression

    out, max_steps, ckpt_path = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)

    class Slow(Regression):
        def training_step(self, batch, batch_idx):
            time.sleep(0.05)  # long enough for the test to send a signal mid-run
            return super().training_step(batch, batch_idx)

    class Report(Callback):
        def _write(self, trainer, name, **values):
            with open(os.path.join(out, f"{{name}}{{trainer.global_rank}}.json"), "w") as f:
                json.dump(dict(values, pid=os.getpid()), f)

        def on_train_batch_end(self, trainer, *args):
            self._write(trainer, "progress", step=trainer.global_step)

        def on_exception(self, trainer, pl_module, exception):
            self._write(trainer, "stopped", step=trainer.global_step, exception=type(exception).__name__)

        def on_train_end(self, trainer, pl_module):
            self._write(trainer, "finished", step=trainer.global_step)

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DeslocStrategy(param_sync_every=8), max_steps=max_steps,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Report(), ModelCheckpoint(dirpath=os.path.join(out, "ck"), every_n_train_steps=8,
                                                             save_top_k=-1, save_last=True)])
    trainer.fit(Slow(n_batches=max_steps), ckpt_path=ckpt_path)
""")


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(FIT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "400"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (progress := _read(tmp_path / "progress1.json")) is None or progress["step"] < 10:
            assert proc.poll() is None and time.monotonic() < deadline, "rank 1 never reached step 10"
            time.sleep(0.02)
        os.kill(progress["pid"], signal.SIGTERM)  # rank 1 only: rank 0 learns it from the next round
        signalled_at = _read(tmp_path / "progress1.json")["step"]
        output, _ = proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    stopped = [_read(tmp_path / f"stopped{rank}.json") for rank in (0, 1)]
    assert all(stopped), output[-3000:]
    assert stopped[0]["exception"] == stopped[1]["exception"] == "SIGTERMException"
    assert stopped[0]["step"] == stopped[1]["step"], stopped
    # raised during step signalled_at + 1 at the latest, it rides on the next round (a multiple of 8) and is
    # read one step later; the rank stops before the batch after that
    next_round = (signalled_at // 8 + 1) * 8
    assert signalled_at < stopped[0]["step"] <= next_round + 8 + 1, (signalled_at, stopped)
    assert not (tmp_path / "finished0.json").exists()

    # the run resumes from its last checkpoint and finishes
    last = tmp_path / "ck" / "last.ckpt"
    saved_at = torch.load(last, weights_only=True)["global_step"]
    assert saved_at % 8 == 0 and saved_at <= stopped[0]["step"]
    env["MASTER_PORT"] = str(free_port())
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path), str(saved_at + 16), str(last)], env=env,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert _read(tmp_path / "finished0.json")["step"] == _read(tmp_path / "finished1.json")["step"] == saved_at + 16
