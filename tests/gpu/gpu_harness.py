"""Launching ``gpu_worker.py`` as real worker processes, and what the GPU tests share.

Two ways to get two ranks:

* :func:`launch` (two ranks on one device): starts both processes itself with a torchelastic-style
  environment, ``RANK=r, GROUP_RANK=r, LOCAL_RANK=0, WORLD_SIZE=2, LOCAL_WORLD_SIZE=1``, so Lightning
  (``TorchElasticEnvironment``: ``TORCHELASTIC_RUN_ID`` is set) sees two one-device "nodes",
  ``Trainer(devices=1, num_nodes=2)``, and both root devices are device 0. One Lightning launch would
  never put two ranks on one device id;
* :func:`launch_multi_device`: one process with ``devices=2``; the Trainer's own launcher starts the
  second rank on the second device.

:data:`MODE` says what the tests run on: ``cuda`` (the default, needs a GPU) or ``cpu`` when
``DESLOC_GPU_TESTS_ON_CPU=1``, which runs the same fits on CPU with plain gloo to check the harness and the
tests' expectations on a machine without a GPU (``conftest.py`` skips the directory otherwise).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "gpu_worker.py"
#: wall-clock seconds one launch may take before its processes are killed
LAUNCH_TIMEOUT_S = float(os.environ.get("DESLOC_GPU_TESTS_TIMEOUT_S", "240"))

ON_CPU = os.environ.get("DESLOC_GPU_TESTS_ON_CPU") == "1"
#: "cuda" or "cpu" (the harness check)
MODE = "cpu" if ON_CPU else "cuda"
#: the process group backend of the one-device fits: CUDA tensors only, as NCCL (plain gloo on CPU)
ONE_DEVICE_BACKEND = "gloo" if ON_CPU else "cuda:gloo"
#: the device both ranks of a one-device launch must train on
SHARED_DEVICE = "cpu" if ON_CPU else "cuda:0"

# the worker's model (gpu_worker.IN, HIDDEN, OUT = 8, 16, 4), counted by hand: two weights, two biases
N_PARAMS = 8 * 16 + 16 + 16 * 4 + 4

#: variables of an outer launcher (pytest itself under torchrun, SLURM) that must not reach the workers
_LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                       "GROUP_RANK", "ROLE_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                       "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_NTASKS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.update(
        OMP_NUM_THREADS="1",  # two ranks on one machine: no thread oversubscription
        CUBLAS_WORKSPACE_CONFIG=":4096:8",  # deterministic cuBLAS (Trainer(deterministic=True) needs it)
        PYTHONUNBUFFERED="1",
    )
    return env


def _worker_command(scenario: str, out: Path, accelerator: str, backend: str, devices: int = 1) -> list[str]:
    return [sys.executable, str(WORKER), "--scenario", scenario, "--out", str(out),
            "--accelerator", accelerator, "--backend", backend, "--devices", str(devices)]


def _wait(procs: list[subprocess.Popen], logs: list[Path], what: str) -> None:
    """Wait for every process; when one fails (its peer would block in a collective) or the launch runs
    past :data:`LAUNCH_TIMEOUT_S`, kill the others and fail with the end of every log."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    failure = None
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            failure = "a rank failed"
            break
        if time.monotonic() > deadline:
            failure = f"timed out after {LAUNCH_TIMEOUT_S:.0f} s"
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if failure is None and all(p.returncode == 0 for p in procs):
        return
    tails = "\n".join(f"----- {log.name} (exit code {p.returncode}) -----\n{log.read_text()[-5000:]}"
                      for p, log in zip(procs, logs))
    raise AssertionError(f"{what}: {failure or 'a rank failed'}\n{tails}")


def _read_ranks(out: Path, world: int) -> list[dict[str, Any]]:
    # torch.load without map_location: the workers saved CPU tensors only
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return results


def launch(scenario: str, out: Path, backend: str = ONE_DEVICE_BACKEND, world: int = 2) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` processes sharing device 0, each told it is node ``r`` of ``world``
    with one device; returns every rank's ``rank<r>.pt``, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = _base_env()
        env.update(TORCHELASTIC_RUN_ID=f"desloc-gpu-tests-{port}", RANK=str(rank), GROUP_RANK=str(rank),
                   LOCAL_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = out / f"log-rank{rank}.txt"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen(_worker_command(scenario, out, MODE, backend), env=env, cwd=str(out),
                                          stdout=f, stderr=subprocess.STDOUT))
    _wait(procs, logs, f"scenario {scenario!r} on {world} processes sharing {SHARED_DEVICE} ({backend})")
    return _read_ranks(out, world)


def launch_multi_device(scenario: str, out: Path, backend: str, devices: int = 2) -> list[dict[str, Any]]:
    """Run ``scenario`` with ``Trainer(devices=devices)``: one process, whose Trainer starts the others
    (one device each); returns every rank's ``rank<r>.pt``."""
    out.mkdir(parents=True, exist_ok=True)
    env = _base_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    log = out / "log-launcher.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(_worker_command(scenario, out, MODE, backend, devices), env=env, cwd=str(out),
                                stdout=f, stderr=subprocess.STDOUT)
    _wait([proc], [log], f"scenario {scenario!r} on {devices} devices ({backend})")
    # rank 0's process exits once every rank has reached its exit (the strategy waits for them at exit),
    # so every rank's file is written by now
    return _read_ranks(out, devices)


def model_bytes(element_size: int = 4) -> int:
    """Bytes of one copy of the worker's parameters (``element_size`` bytes per element)."""
    return N_PARAMS * element_size


def mean_over_ranks(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The mean the ranks should agree on: summed in rank order in the tensors' dtype, divided by the count."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total / len(tensors)


# ----------------------------------------------------------------------------------------------- checks
def assert_trained_on(ranks: list[dict[str, Any]], devices: list[str]) -> None:
    """Rank ``r``'s root device, parameters and tensor optimizer states are all on ``devices[r]`` (Adam's
    ``step`` counter is a CPU tensor by design, ``capturable=False``, and is left out)."""
    for r, (result, device) in enumerate(zip(ranks, devices)):
        assert result["global_rank"] == r and result["world_size"] == len(ranks)
        assert result["root_device"] == device, (r, result["root_device"])
        assert result["param_devices"] == [device], (r, result["param_devices"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert result["state_devices"][key] == [device], (r, key, result["state_devices"][key])
        if device.startswith("cuda"):
            assert result["cuda_current_device"] == torch.device(device).index


def assert_schedule_rounds(ranks: list[dict[str, Any]], steps: int, round_steps: set[int]) -> None:
    """After each step in ``round_steps`` every rank holds the exact mean of the ranks' local parameters
    of that step; after any other step each rank keeps its own, and the ranks differ."""
    for s in range(1, steps + 1):
        local = [r["pre"][s]["params"] for r in ranks]
        if s in round_steps:
            mean = mean_over_ranks(local)
            for r, result in enumerate(ranks):
                assert torch.equal(result["post"][s], mean), (s, r)
        else:
            for r, result in enumerate(ranks):
                assert torch.equal(result["post"][s], local[r]), (s, r)
            assert not torch.equal(local[0], local[1]), s
