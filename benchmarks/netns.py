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
