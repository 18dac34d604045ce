"""The premise of tests/gpu: the one-device fits' backend, ``cuda:gloo``, rejects CPU tensors in collectives
exactly as NCCL does, so a fit that passes under it hands NCCL no CPU tensor. Runs under ``cuda:gloo``
also in the CPU check (the group initialises without a GPU; only the CUDA half needs one)."""

import pytest
import torch

from gpu_harness import MODE, launch


def test_cuda_gloo_rejects_cpu_tensors_like_nccl(tmp_path):
    ranks = launch("rejects_cpu", tmp_path, backend="cuda:gloo")
    for r, result in enumerate(ranks):
        assert result["global_rank"] == r
        assert result["backend"] == "cuda:gloo"
        assert result["cpu_error"] is not None and "No backend type associated with device type cpu" in result["cpu_error"]
        if torch.cuda.is_available():
            assert result["cuda_sum"] == 1.0 + 2.0  # rank 0 sent 1, rank 1 sent 2


def test_a_cpu_tensor_in_a_fit_fails_the_launch_with_the_nccl_error(tmp_path):
    """The negative control of every fit test: a fit whose tensors are on the CPU, under ``cuda:gloo``,
    must fail and the harness must say why (not hang on the peer). Only meaningful where the fit's
    tensors are on the CPU, i.e. in the CPU check of the harness."""
    if MODE != "cpu":
        pytest.skip("on a GPU the fit's tensors are on the device; this control needs them on the CPU")
    with pytest.raises(AssertionError, match="No backend type associated with device type cpu"):
        launch("fit", tmp_path, backend="cuda:gloo")
