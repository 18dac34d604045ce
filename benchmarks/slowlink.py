"""A slow link between two Lightning "nodes" on one Linux machine, and small callbacks for the benchmarks.

:class:`SlowLink` (root only) creates two network namespaces joined by a veth pair, gives the ends
addresses (``10.77.0.1/24`` and ``10.77.0.2/24`` by default), limits both ends' egress with a token
bucket (``tc qdisc ... root tbf rate 100mbit``), and removes all of it on exit (namespaces, and with
them the veth pair and the qdiscs). Nothing is routed outside the two namespaces.

:func:`run_two_nodes` starts one process per node (``ip netns exec NS env MASTER_ADDR=... NODE_RANK=...
GLOO_SOCKET_IFNAME=... python ...``), the way Lightning's default cluster environment expects two
machines to be started. Without a :class:`SlowLink` (``link=None``) both nodes run on loopback.

The callbacks (:class:`TrainClock`, :class:`StopAndCheckpoint`) are referenced by class path from the
GPT example's command line (``--trainer.callbacks+=slowlink.TrainClock`` with ``benchmarks/`` on
``PYTHONPATH``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from netns import parse_rate  # noqa: F401  (part of this module's interface)
from netns import NamespaceLink
from netns import sh as _sh

REPO = Path(__file__).resolve().parent.parent


def can_make_link() -> tuple[bool, str]:
    """Whether this process can build a :class:`SlowLink`, and if not, why."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found"
    return True, ""


class SlowLink(NamespaceLink):
    """Two namespaces and a rate-limited veth pair between them; use as a context manager.

    ``rate``, ``burst`` and ``latency`` are ``tc tbf`` arguments, applied to the egress of both ends.
    SIGTERM and SIGHUP inside the ``with`` block are turned into ``SystemExit`` so that the teardown runs.
    """

    def __init__(self, rate: str = "100mbit", burst: str = "64kb", latency: str = "100ms",
                 addrs: tuple[str, str] = ("10.77.0.1", "10.77.0.2"), prefix: int = 24) -> None:
        super().__init__(rate, addrs, "dlsl", "dlv", f"{os.getpid() % 100000}")
        self.prefix = prefix
        self.burst, self.latency = burst, latency

    def commands(self) -> list[str]:
        """The shell commands :meth:`up` runs, for the documentation."""
        (na, nb), (da, db), (aa, ab) = self.namespaces, self.devices, self.addrs
        tbf = f"tbf rate {self.rate} burst {self.burst} latency {self.latency}"
        return [
            f"ip netns add {na}",
            f"ip netns add {nb}",
            f"ip link add {da} type veth peer name {db}",
            f"ip link set {da} netns {na}",
            f"ip link set {db} netns {nb}",
            f"ip -n {na} addr add {aa}/{self.prefix} dev {da}",
            f"ip -n {nb} addr add {ab}/{self.prefix} dev {db}",
            f"ip -n {na} link set lo up",
            f"ip -n {nb} link set lo up",
            f"ip -n {na} link set {da} up",
            f"ip -n {nb} link set {db} up",
            f"ip netns exec {na} tc qdisc add dev {da} root {tbf}",
            f"ip netns exec {nb} tc qdisc add dev {db} root {tbf}",
        ]

    def up(self) -> "SlowLink":
        ok, why = can_make_link()
        if not ok:
            raise RuntimeError(f"cannot build the slow link: {why}")
        try:
            self._run_commands()
        except subprocess.CalledProcessError as err:
            self.down()
            raise RuntimeError(f"{' '.join(err.cmd)} failed: {err.stderr.strip()}") from err
        return self

    def down(self) -> None:
        """Delete what :meth:`up` created (the veth pair goes with its namespaces). Idempotent."""
        for item in reversed(self._created):
            if item.startswith("veth:"):
                _sh("ip", "link", "del", item[5:], check=False)  # only if still in the root namespace
            else:
                _sh("ip", "netns", "del", item, check=False)
        self._created = []

    def qdisc_stats(self) -> list[str]:
        return [_sh("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev, check=False).stdout.strip()
                for ns, dev in zip(self.namespaces, self.devices)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(argv: Sequence[str], link: Optional[SlowLink], logs: Sequence[Path], timeout: float,
                  extra_env: Optional[dict[str, str]] = None, port: Optional[int] = None) -> list[int]:
    """Run ``argv`` once per node (node 0 in the first namespace), wait for both; return exit codes.

    Each node's stdout and stderr go to ``logs[node]``. The environment is what Lightning's default
    cluster environment reads for a 2-node job: ``MASTER_ADDR`` (node 0's address), ``MASTER_PORT``,
    ``NODE_RANK``; plus ``GLOO_SOCKET_IFNAME`` (the veth end) so that gloo uses the slow link. Each
    node gets one intra-op thread (the machine's cores are shared between the two "machines").
    On timeout or interruption both processes are killed.
    """
    port = port or free_port()
    master = link.addrs[0] if link is not None else "127.0.0.1"
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for node in range(2):
            env = dict(os.environ)
            env.update({"MASTER_ADDR": master, "MASTER_PORT": str(port), "NODE_RANK": str(node),
                        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
            env.pop("LOCAL_RANK", None)
            env.pop("WORLD_SIZE", None)
            if link is not None:
                env["GLOO_SOCKET_IFNAME"] = link.devices[node]
                cmd = ["ip", "netns", "exec", link.namespaces[node], *argv]
            else:
                env["GLOO_SOCKET_IFNAME"] = "lo"
                cmd = list(argv)
            env.update(extra_env or {})
            f = open(logs[node], "w")
            files.append(f)
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        return codes
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for f in files:
            f.close()


# ---------------------------------------------------------------------- callbacks for the GPT example
try:
    import lightning.pytorch as pl

    class TrainClock(pl.Callback):
        """Logs ``time/train_s`` after every validation: wall clock since the first training batch,
        not counting the validation passes themselves (they only observe; every run does the same ones).

        Also logs ``time/fit_s`` (validation included) at the same points. With ``stop_below`` (or the
        environment variable ``SLOWLINK_STOP_BELOW``) training stops at the first validation whose
        ``val/loss`` (synchronised over ranks, so every rank decides alike) is at or below it."""

        def __init__(self, stop_below: Optional[float] = None) -> None:
            env = os.environ.get("SLOWLINK_STOP_BELOW")
            self.stop_below = stop_below if stop_below is not None else (float(env) if env else None)
            self._start: Optional[float] = None
            self._paused_total = 0.0
            self._pause_start: Optional[float] = None

        def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self._start is None:
                self._start = time.perf_counter()

        def on_validation_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
            if self._start is not None and not trainer.sanity_checking:
                self._pause_start = time.perf_counter()

        def on_validation_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
            if self._start is None or self._pause_start is None:
                return
            now = time.perf_counter()
            train_s = self._pause_start - self._start - self._paused_total
            self._paused_total += now - self._pause_start
            self._pause_start = None
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({"time/train_s": train_s, "time/fit_s": now - self._start},
                                       step=trainer.global_step)
            loss = trainer.callback_metrics.get("val/loss")
            if self.stop_below is not None and loss is not None and float(loss) <= self.stop_below:
                trainer.should_stop = True

        def teardown(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
            # The last hook of fit: leave together and close gloo's connections now. Left to interpreter
            # exit, one node intermittently aborted ("terminate called without an active exception")
            # when its peer had already gone, after all work was done.
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    class StopAndCheckpoint(pl.Callback):
        """Save a checkpoint with ``trainer.save_checkpoint(path)`` after optimizer step ``step`` and stop."""

        def __init__(self, step: int, path: str) -> None:
            self.step = step
            self.path = path

        def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            if trainer.global_step == self.step:
                trainer.save_checkpoint(self.path)
                trainer.should_stop = True

except ImportError:  # pragma: no cover - lightning is a dependency of the package
    pass


def python() -> str:
    return sys.executable
