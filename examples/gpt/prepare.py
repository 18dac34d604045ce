"""Tokenise the standard library's ``.py`` files into litdata shards ahead of training (optional:
the data module does the same on first use).

    python examples/gpt/prepare.py --data_dir data/gpt-stdlib --max_bytes 4000000 --block_size 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import prepare_corpus, stdlib_dir  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/gpt-stdlib", help="output: <data_dir>/train, <data_dir>/val")
    p.add_argument("--source_dir", default=None, help=f"tree of .py files (default: the stdlib, {stdlib_dir()})")
    p.add_argument("--max_bytes", type=int, default=4_000_000, help="cap on source bytes read")
    p.add_argument("--block_size", type=int, default=128, help="tokens per example")
    p.add_argument("--val_every", type=int, default=20, help="every N-th file is held out for validation")
    p.add_argument("--num_workers", type=int, default=1, help="litdata.optimize worker processes")
    args = p.parse_args(argv)
    start = time.perf_counter()
    manifest = prepare_corpus(
        args.data_dir, args.source_dir, args.max_bytes, args.block_size, args.val_every, num_workers=args.num_workers
    )
    print(json.dumps(manifest, indent=2))
    print(f"prepared {args.data_dir} in {time.perf_counter() - start:.1f} s")
    return manifest


if __name__ == "__main__":
    main()
