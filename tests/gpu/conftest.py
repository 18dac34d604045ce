"""tests/gpu run only where CUDA is: every test in this directory is skipped without a GPU, unless
``DESLOC_GPU_TESTS_ON_CPU=1`` asks to run them on CPU with plain gloo (a check of the harness and of the
tests' own expectations; it proves nothing about devices)."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_harness, also for a run of one file

import gpu_harness  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or gpu_harness.ON_CPU:
        return
    skip = pytest.mark.skip(reason="needs CUDA (DESLOC_GPU_TESTS_ON_CPU=1 runs tests/gpu on CPU to check the harness)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
