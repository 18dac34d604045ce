"""benchmarks/memory.py's CPU measure (profiler allocator events over the whole run, read per window)
against allocations whose peaks are known by construction. Seconds, in this process."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
MIB = 2**20


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_meter_counts_what_an_operation_adds_on_top_of_what_was_live():
    memory = load_benchmark()
    meter = memory.PeakMeter(torch.device("cpu"))
    kept = [torch.empty(4 * MIB, dtype=torch.uint8)]  # live before every window

    def keep_one():
        kept.append(torch.empty(4 * MIB, dtype=torch.uint8))

    def two_transient():
        a = torch.empty(4 * MIB, dtype=torch.uint8)
        b = torch.empty(4 * MIB, dtype=torch.uint8)
        del a, b

    def replace_older():  # frees a tensor made before the window first: nothing on top of the start
        kept[0] = None
        kept[0] = torch.empty(4 * MIB, dtype=torch.uint8)

    meter.measure("keep one", keep_one)
    meter.measure("two transient", two_transient)
    meter.measure("replace older", replace_older)
    peaks = meter.finish()
    assert peaks == {"keep one": 4 * MIB, "two transient": 8 * MIB, "replace older": 0}
