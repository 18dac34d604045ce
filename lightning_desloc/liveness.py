"""Fast failure detection without a round timeout: each rank's liveness, signalled outside the collectives.

A rank that is gone leaves its peers blocked in the next collective until the process group's timeout
(30 minutes by default), and only then can ``torchrun --max-restarts`` (or a scheduler) restart the
group. A short collective timeout is no cure: one DES-LOC round of a large model over a slow link can
take minutes. So liveness is kept apart from progress:

* every rank runs a **heartbeat** thread that writes a counter, ``lightning_desloc/liveness/<session>/<rank>``,
  into the rendezvous store every ``heartbeat_s = peer_timeout_s / 6`` seconds, and reads its peers'
  counters in the same request cycle (one ``set`` and one ``multi_get`` per heartbeat);
* a **watchdog** thread, which never touches the store (a store request to a host that froze or whose
  machine vanished blocks without a bound), judges what the heartbeat thread last saw, on this
  process's monotonic clock (the machines' clocks need not agree): a peer whose counter has not moved
  for ``peer_timeout_s`` seconds, or a store that has not answered for that long, is lost (a peer is
  judged only while the store answers: when it has missed answers, the store's silence decides). It then logs
  an error naming the rank(s) and how long they were silent, and ends this process with exit code
  :data:`PEER_LOST_EXIT_CODE` through ``os._exit``: the main thread may be inside a collective that
  will never complete, so a normal exit (``atexit`` hooks, Python's shutdown) could block too.

A long round, a slow rank or a long checkpoint save never trips it: the heartbeat threads keep
beating while the main threads wait. What does trip it is a process that is dead, frozen (``SIGSTOP``,
a suspended VM) or on a machine that can no longer be reached, and a process that holds Python's GIL
for longer than ``peer_timeout_s`` (a C extension that never releases it), whose heartbeat thread
cannot run. A live process stuck in its own code (a deadlock, a hung GPU kernel) keeps beating and is
not detected here.

A rank that finishes normally writes ``left`` in place of its counter (:meth:`PeerLiveness.stop`), so
that its peers do not take its silence for a death; a rank going down on an error does not, so that
its peers stop waiting for it. The store lives in rank 0's process under Lightning's launchers and
under ``torchrun`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (in the torchrun agent otherwise):
when it stops answering after rank 0 said ``left``, that is the end of the run, not a failure.

The store is used through :meth:`torch.distributed.Store.clone`, a connection of the heartbeat
thread's own: torch documents a clone as the way to use a store from another thread, and the main
thread's own store requests (gloo's connection setup, the exit hook) never queue behind a heartbeat.

This module does not know about Lightning; the strategies start :func:`watch_process_group` when their
process group is up and stop it (:func:`stop_watching`) when their stage ends or the process exits.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

#: exit status of a rank that stopped because a peer (or the store) was lost: ``EX_TEMPFAIL`` of
#: ``sysexits.h``, "try again later", which is what a restart from the last checkpoint does
PEER_LOST_EXIT_CODE = 75
#: heartbeats per ``peer_timeout_s``: a live peer is seen to move about 6 times per timeout, so one or
#: two late heartbeats (a loaded machine, a slow store) are far from a false alarm
HEARTBEATS_PER_TIMEOUT = 6
#: store key prefix (inside the process group's own store prefix)
KEY_PREFIX = "lightning_desloc/liveness"
#: what a rank that finished normally writes in place of its counter
LEFT = b"left"
HEARTBEAT_THREAD = "desloc-heartbeat"
WATCHDOG_THREAD = "desloc-watchdog"


def heartbeat_period(peer_timeout_s: float) -> float:
    """Seconds between two heartbeats of a rank for a given ``peer_timeout_s`` (seconds)."""
    return peer_timeout_s / HEARTBEATS_PER_TIMEOUT


@dataclass(frozen=True)
class PeerLoss:
    """What the watchdog concluded. Durations in seconds, on the judging rank's monotonic clock."""

    #: the rank that judged
    rank: int
    #: the silent peers: rank -> seconds since its counter last moved (or since watching began)
    silent: dict[int, float]
    #: seconds since the store last answered a heartbeat, when that is the reason (else ``None``)
    store_silent_s: Optional[float]
    peer_timeout_s: float
    #: the last error a store request raised, if any
    store_error: Optional[str] = None

    def describe(self) -> str:
        if self.store_silent_s is not None:
            what = (f"the rendezvous store (hosted by rank 0, or by the torchrun agent) has not answered for "
                    f"{self.store_silent_s:.1f} s" + (f" (last error: {self.store_error})" if self.store_error else "")
                    + ": rank 0 died or its machine is unreachable")
        else:
            ranks = sorted(self.silent)
            names = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            what = (f"{names} sent no heartbeat for {', '.join(f'{self.silent[r]:.1f}' for r in ranks)} s: "
                    f"{'they are' if len(ranks) > 1 else 'it is'} dead, frozen or unreachable")
        return (f"[rank {self.rank}] DES-LOC liveness: {what} (peer_timeout_s={self.peer_timeout_s:g}). "
                f"Rank {self.rank} exits with code {PEER_LOST_EXIT_CODE} instead of waiting for the process "
                "group's timeout, so that torchrun --max-restarts (or the scheduler) can restart the group "
                "from the last checkpoint.")


def exit_process(loss: PeerLoss) -> None:
    """The default reaction to a loss: log it, flush, and end this process at once with
    :data:`PEER_LOST_EXIT_CODE` (``os._exit``: no ``atexit`` hook, which could wait on the lost peer)."""
    try:
        log.error(loss.describe())  # to the configured handlers, else to stderr (logging's last resort)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
    finally:
        os._exit(PEER_LOST_EXIT_CODE)


@dataclass
class _Seen:
    """The heartbeat thread's view of one peer, for the watchdog (times on the monotonic clock)."""

    value: Optional[bytes] = None
    changed_at: float = 0.0
    left: bool = False


@dataclass
class LivenessStats:
    """Counts of one :class:`PeerLiveness` (for the cost of the heartbeats)."""

    heartbeats: int = 0
    #: requests sent to the store (``set``, ``multi_get``, ``check``), each one round trip
    store_requests: int = 0
    store_errors: int = 0
    #: seconds since :meth:`PeerLiveness.start`
    elapsed_s: float = 0.0
    peers_left: list[int] = field(default_factory=list)

    @property
    def store_requests_per_s(self) -> float:
        return self.store_requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


class PeerLiveness:
    """Heartbeats of rank ``rank`` of ``world_size`` through ``store`` and a watchdog over the others'.

    Args:
        store: a store every rank reaches, used by this object's heartbeat thread only (pass a clone,
            :meth:`torch.distributed.Store.clone`, of a store other threads use).
        rank, world_size: this rank and the number of ranks.
        peer_timeout_s: seconds without a peer's heartbeat (or without an answer from the store) after
            which it counts as lost; heartbeats go out every ``peer_timeout_s / 6`` seconds.
        session: distinguishes successive watches over the same store (keys of a finished one keep
            their ``left``); every rank must use the same number.
        on_loss: called once, from the watchdog thread, with the :class:`PeerLoss`; the default,
            :func:`exit_process`, ends the process.
        store_host_rank: the rank whose process hosts the store, or ``None`` when no rank does (the
            torchrun agent's store); once it has said ``left``, a store that stops answering is the end
            of the run rather than a failure.
    """

    def __init__(self, store: Any, rank: int, world_size: int, peer_timeout_s: float, *, session: int = 0,
                 on_loss: Optional[Callable[[PeerLoss], None]] = None, store_host_rank: Optional[int] = 0) -> None:
        if not peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s must be a positive number of seconds, got {peer_timeout_s!r}")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.peer_timeout_s = float(peer_timeout_s)
        self.heartbeat_s = heartbeat_period(self.peer_timeout_s)
        self.session = session
        self.on_loss = on_loss if on_loss is not None else exit_process
        self.store_host_rank = store_host_rank
        self.peers = [r for r in range(world_size) if r != rank]
        #: the loss the watchdog found (``None``: none)
        self.loss: Optional[PeerLoss] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._announce_left = False
        self._threads: list[threading.Thread] = []
        self._stats = LivenessStats()
        self._started_at = 0.0
        self._last_answer = 0.0
        self._store_error: Optional[str] = None
        self._seen = {r: _Seen() for r in self.peers}
        self._present: set[int] = set()

    def key(self, rank: int) -> str:
        return f"{KEY_PREFIX}/{self.session}/{rank}"

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stats(self) -> LivenessStats:
        with self._lock:
            s = self._stats
            return LivenessStats(s.heartbeats, s.store_requests, s.store_errors,
                                 time.monotonic() - self._started_at if self._started_at else 0.0,
                                 sorted(r for r, seen in self._seen.items() if seen.left))

    # ------------------------------------------------------------------ start / stop
    def start(self) -> "PeerLiveness":
        if self._threads:
            raise RuntimeError("this PeerLiveness was already started; make a new one for a new watch")
        now = time.monotonic()
        self._started_at = self._last_answer = now
        for seen in self._seen.values():
            seen.changed_at = now  # a peer that never beats is lost peer_timeout_s after the watch began
        self._threads = [threading.Thread(target=self._beat_loop, name=HEARTBEAT_THREAD, daemon=True),
                         threading.Thread(target=self._watch_loop, name=WATCHDOG_THREAD, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, left: bool = True) -> None:
        """Stop both threads. ``left=True`` (a normal end) first writes ``left`` for this rank, so peers
        that go on watching do not count its silence as a death; ``left=False`` (this rank is failing)
        writes nothing, and peers stop waiting for it after ``peer_timeout_s``. Waits at most
        ``max(1, heartbeat_s)`` seconds per thread (a store that does not answer is not waited for)."""
        if not self._threads:
            return
        self._announce_left = left
        self._stop.set()
        for t in reversed(self._threads):  # the watchdog first: it must not judge while this rank leaves
            t.join(max(1.0, self.heartbeat_s))

    # ------------------------------------------------------------------ the heartbeat thread
    def _beat_loop(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self._request(self.store.set, self.key(self.rank), str(count))
                values = self._read_peers()
            except Exception as error:  # the store is gone or failing: the watchdog judges its silence
                with self._lock:
                    self._stats.store_errors += 1
                    self._store_error = f"{type(error).__name__}: {str(error)[:200]}"
                    host_left = self.store_host_rank in self._seen and self._seen[self.store_host_rank].left
                if host_left:
                    return  # the store went with its host, which finished normally: the run is ending
            else:
                self._note(values, time.monotonic())
            with self._lock:
                self._stats.heartbeats += 1
            self._stop.wait(self.heartbeat_s)
        if self._announce_left:
            try:
                self._request(self.store.set, self.key(self.rank), LEFT)
            except Exception:  # the store is already gone: nobody is left to tell
                pass

    def _request(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            self._stats.store_requests += 1
        return fn(*args)

    def _read_peers(self) -> dict[int, bytes]:
        # multi_get waits for a missing key, so read only the peers whose key exists (check() never waits)
        missing = [r for r in self.peers if r not in self._present]
        if missing and self._request(self.store.check, [self.key(r) for r in missing]):
            self._present.update(missing)
        elif missing:
            for r in missing:
                if self._request(self.store.check, [self.key(r)]):
                    self._present.add(r)
        present = [r for r in self.peers if r in self._present]
        if not present:
            return {}
        values = self._request(self.store.multi_get, [self.key(r) for r in present])
        return dict(zip(present, values))

    def _note(self, values: dict[int, bytes], now: float) -> None:
        with self._lock:
            self._last_answer = now
            for r, value in values.items():
                seen = self._seen[r]
                if value == LEFT:
                    seen.left = True
                elif value != seen.value:
                    seen.value, seen.changed_at = value, now

    # ------------------------------------------------------------------ the watchdog thread
    def _watch_loop(self) -> None:
        period = self.heartbeat_s / 2
        previous = time.monotonic()
        while not self._stop.wait(period):
            now = time.monotonic()
            if now - previous > 2 * self.heartbeat_s:
                # this process itself did not run for a while (suspended, starved of the GIL): what the
                # heartbeat thread saw is stale, so judge only on evidence gathered from now on. (A shorter
                # stall leaves the evidence at most 3 heartbeats = peer_timeout_s / 2 old: no false alarm.)
                self._rebase(now)
            previous = now
            loss = self._judge(now)
            if loss is not None and not self._stop.is_set():
                self.loss = loss
                self.on_loss(loss)
                return

    def _rebase(self, now: float) -> None:
        with self._lock:
            self._last_answer = max(self._last_answer, now)
            for seen in self._seen.values():
                seen.changed_at = max(seen.changed_at, now)

    def _judge(self, now: float) -> Optional[PeerLoss]:
        with self._lock:
            watched = {r: seen for r, seen in self._seen.items() if not seen.left}
            silence = {r: now - seen.changed_at for r, seen in watched.items()}
            store_silent = now - self._last_answer
            host_left = self.store_host_rank is not None and self._seen.get(self.store_host_rank, _Seen()).left
            if store_silent > self.peer_timeout_s:
                if host_left or not watched:
                    return None  # the run is ending: the store's host (or everyone) finished normally
                return PeerLoss(self.rank, silence, store_silent, self.peer_timeout_s, self._store_error)
            if store_silent > 2 * self.heartbeat_s:
                # the store has missed answers: what it last said of the peers is stale, and a peer's
                # silence then cannot be told from the store's (a frozen store host stops both); the
                # store's own silence decides, above, within peer_timeout_s
                return None
            lost = {r: s for r, s in silence.items() if s > self.peer_timeout_s}
            return PeerLoss(self.rank, lost, None, self.peer_timeout_s) if lost else None


# ---------------------------------------------------------------------------- the default process group
_active: Optional[PeerLiveness] = None
_sessions = 0


def watch_process_group(peer_timeout_s: Optional[float],
                        on_loss: Optional[Callable[[PeerLoss], None]] = None) -> Optional[PeerLiveness]:
    """Start watching the ranks of the default process group (through a clone of its store), unless
    ``peer_timeout_s`` is ``None``, the group is not initialised or has one rank, or a watch is already
    running. Call it on every rank, the same number of times. Returns the running watch, or ``None``."""
    global _active, _sessions
    if peer_timeout_s is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    if _active is not None and _active.running:
        return _active
    try:
        store = dist.distributed_c10d._get_default_store().clone()
    except Exception as error:  # a store type without clone(): no safe second connection for a thread
        log.warning(f"DES-LOC liveness is off: the process group's store cannot be cloned ({error}); a dead "
                    "rank will only be noticed at the process group's timeout.")
        return None
    _active = PeerLiveness(store, dist.get_rank(), dist.get_world_size(), peer_timeout_s, session=_sessions,
                           on_loss=on_loss)
    _sessions += 1
    return _active.start()


def stop_watching(left: bool = True) -> None:
    """Stop the running watch of the default process group (see :meth:`PeerLiveness.stop`); no-op without one."""
    global _active
    watch, _active = _active, None
    if watch is not None:
        watch.stop(left=left)


def active() -> Optional[PeerLiveness]:
    """The running watch of the default process group, if any."""
    return _active if _active is not None and _active.running else None


def thread_names() -> Sequence[str]:
    """Names of this process's liveness threads that are alive (empty when none runs)."""
    return [t.name for t in threading.enumerate() if t.name in (HEARTBEAT_THREAD, WATCHDOG_THREAD)]
