import sys
from pathlib import Path

# tests import their small helpers (helpers.py, reference.py) as top-level modules,
# also inside spawned worker processes
sys.path.insert(0, str(Path(__file__).parent))
