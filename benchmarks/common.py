"""Small helpers shared by the benchmark scripts: markdown tables, a collective-call counter, and the
one reader of "bytes a rank has sent by step t" from a run's ``metrics.csv``.

The counter replaces ``torch.distributed.all_reduce`` (and ``broadcast``/``all_gather``) inside a
worker process by a wrapper that adds up the payload bytes of every call, keyed by the module that
called it. It is an independent count: it knows nothing about the strategy's ledger.

:func:`bytes_sent_by_step` (``{step: bytes}`` from a CSVLogger ``metrics.csv``'s rows; setup broadcast
excluded, carried forward between averaging rounds, ``grad_bytes * (step + 1)`` for DDP) is
``lightning_desloc.plot.bytes_sent_by_step``, re-exported here: the package's plot command needs it
and cannot import ``benchmarks/``, so there is a single implementation, there. :func:`read_rows` reads
the rows.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the package, for scripts run from a checkout without installing it
    sys.path.append(str(REPO))

from lightning_desloc.plot import bytes_sent_by_step  # noqa: E402  (the one implementation; see above)

__all__ = ["REPO", "CollectiveCounter", "bytes_sent_by_step", "fmt_int", "markdown_table", "parse_markdown_table",
           "read_rows", "write_json"]


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger ``metrics.csv`` (``path``: the file, or a logger directory holding
    ``version_0/metrics.csv``), as ``csv.DictReader`` gives them: strings, ``""`` for empty cells."""
    path = Path(path)
    if path.is_dir():
        path = path / "version_0" / "metrics.csv"
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are expected already formatted as strings."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def parse_markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in ``text`` whose first header cell is ``first_header``."""
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.lstrip().startswith("|") and cells and cells[0] == first_header:
            headers = cells
            rows = []
            for body in lines[i + 2 :]:
                if not body.lstrip().startswith("|"):
                    break
                values = [c.strip() for c in body.strip().strip("|").split("|")]
                rows.append(dict(zip(headers, values)))
            return rows
    raise ValueError(f"no table starting with column {first_header!r}")


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CollectiveCounter:
    """Counts payload bytes handed to torch.distributed collectives in this process, by caller module.

    ``counts[(op, caller)] = [calls, bytes]``. For ``all_gather`` the payload is the local input tensor
    (the same convention as the ledger). ``all_to_all_single`` is the reduce-scatter half of a
    bfloat16/float16 or compressed average: its input is the payload, as an ``all_reduce``'s; the
    all-gather of the mean chunks that completes it (``all_gather_single``) is not wrapped, so it is not
    counted twice.
    """

    OPS = ("all_reduce", "broadcast", "all_gather", "all_to_all_single")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = {}
        self._originals: dict[str, Any] = {}

    def install(self) -> None:
        if self._originals:
            return
        for op in self.OPS:
            original = getattr(dist, op)
            self._originals[op] = original
            setattr(dist, op, self._wrap(op, original))

    def uninstall(self) -> None:
        for op, original in self._originals.items():
            setattr(dist, op, original)
        self._originals = {}

    def _wrap(self, op: str, original: Any) -> Any:
        counts = self.counts

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            two_tensors = op in ("all_gather", "all_to_all_single")  # (output, input, ...): the input is sent
            payload = args[1] if two_tensors and len(args) > 1 else (args[0] if args else None)
            if payload is None:
                payload = kwargs.get("tensor")
            entry = counts.setdefault((op, caller), [0, 0])
            entry[0] += 1
            entry[1] += _nbytes(payload)
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    def bytes_where(self, op: str | None = None, caller_prefix: str = "") -> int:
        return sum(b for (o, c), (_, b) in self.counts.items() if (op is None or o == op) and c.startswith(caller_prefix))

    def as_json(self) -> list[dict[str, Any]]:
        return [{"op": o, "caller": c, "calls": n, "bytes": b} for (o, c), (n, b) in sorted(self.counts.items())]


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Lay out a matplotlib figure, write it to ``path`` (parents made) and close it."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))


def fmt_int(n: float) -> str:
    return f"{int(n):,}"


class Batches(torch.utils.data.Dataset):
    """``length`` ready-made ``(x, y)`` batches of ``batch x width`` cycling over a small pool (no per-sample
    collation: use ``DataLoader(..., batch_size=None)``)."""

    def __init__(self, length: int, batch: int, width: int, pool: int = 8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(pool, batch, width, generator=g)
        self.y = torch.randn(pool, batch, width, generator=g)
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.x[i % len(self.x)], self.y[i % len(self.y)]
