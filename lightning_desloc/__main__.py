"""``python -m lightning_desloc <command>``: command-line tools. ``periods``: :mod:`lightning_desloc.advisor`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage: python -m lightning_desloc <command> [options]

commands:
  periods   recommend K_x, K_u, K_v for a model size, link and step time
            (python -m lightning_desloc periods --help)"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch to the subcommand; usage on stderr and 2 for a missing or unknown one."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "periods":
        from lightning_desloc.advisor import main as periods_main  # imports torch: only when asked

        return periods_main(args[1:])
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    if args:
        print(f"error: unknown command {args[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
