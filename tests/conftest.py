import sys
from pathlib import Path

# tests import their small helpers (helpers.py, reference.py) as top-level modules,
# also inside spawned worker processes
sys.path.insert(0, str(Path(__file__).parent))

# the tests' worker processes are forked from a server that has imported these once (helpers.START_METHOD)
import multiprocessing  # noqa: E402

multiprocessing.set_forkserver_preload(["torch", "lightning", "lightning_desloc", "helpers", "reference"])
