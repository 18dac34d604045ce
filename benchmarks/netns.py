"""Small helpers shared by the benchmarks' link builders (:mod:`slowlink`, :mod:`delayline`), kept free
of Lightning and torch so that a link's forwarder process starts in no time."""

from __future__ import annotations

import subprocess
from typing import Any


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (``ip``, ``tc``, ...), its output captured as text."""
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def raise_exit(signum: int, frame: Any) -> None:
    """A signal handler turning SIGTERM/SIGHUP into ``SystemExit``, so that a link's teardown runs."""
    raise SystemExit(128 + signum)


def parse_rate(rate: str) -> float:
    """``tc`` rate string -> bytes per second (``100mbit`` -> 12.5e6).

    >>> parse_rate("100mbit"), parse_rate("1gbit"), parse_rate("800")
    (12500000.0, 125000000.0, 100.0)
    """
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "bit": 1 / 8, "kbps": 1e3, "mbps": 1e6, "bps": 1}
    r = rate.lower()
    for unit, factor in units.items():
        if r.endswith(unit):
            return float(r[: -len(unit)]) * factor
    return float(r) / 8


class NamespaceLink:
    """What :class:`slowlink.SlowLink` and :class:`delayline.DelayLink` share: two network namespaces
    ``<ns_prefix><tag>a/b`` with one device each (``<dev_prefix><tag>a/b``), a rate, the commands that
    build them (:meth:`commands`, given by the subclass), and a context manager that builds the link on
    entry, tears it down on exit and turns SIGTERM/SIGHUP inside the block into ``SystemExit`` so that the
    teardown runs. Subclasses implement :meth:`commands`, :meth:`up` (calling :meth:`_run_commands`) and
    :meth:`down` (idempotent, deleting what :attr:`_created` names)."""

    def __init__(self, rate: str, addrs: tuple[str, str], ns_prefix: str, dev_prefix: str, tag: str) -> None:
        self.namespaces = (f"{ns_prefix}{tag}a", f"{ns_prefix}{tag}b")
        self.devices = (f"{dev_prefix}{tag}a", f"{dev_prefix}{tag}b")
        self.addrs = addrs
        self.rate = rate
        #: what :meth:`_run_commands` made, in order: namespace names, ``"veth:<dev>"`` for a veth pair
        self._created: list[str] = []
        self._old_handlers: dict[int, Any] = {}

    @property
    def rate_bytes_per_s(self) -> float:
        return parse_rate(self.rate)

    def commands(self) -> list[str]:
        """The shell commands :meth:`up` runs, for the documentation."""
        raise NotImplementedError

    def up(self) -> "NamespaceLink":
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def _run_commands(self) -> None:
        """Run :meth:`commands` in order, recording what each creates (for :meth:`down`)."""
        for cmd in self.commands():
            sh(*cmd.split())
            if cmd.startswith("ip netns add "):
                self._created.append(cmd.split()[-1])
            elif cmd.startswith("ip link add ") and " type veth " in cmd:
                self._created.append("veth:" + cmd.split()[3])

    def __enter__(self) -> "NamespaceLink":
        import signal

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, raise_exit)
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        import signal

        self.down()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
