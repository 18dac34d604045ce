"""The benchmark scripts run (``--smoke``: tiny models, seconds) and print their tables."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_bench_smoke(tmp_path):
    out = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "checkpoint_bench.py"), "--smoke", "--json", str(out)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "| operation" in proc.stdout and "| save (full)" in proc.stdout
    assert "resume 2 -> 2: local path" in proc.stdout and "resume 2 -> 1: consensus path" in proc.stdout
    raw = json.loads(out.read_text())
    n = raw["n_params"]
    assert n == 2 * 16 * 32 + 16 + 32
    # the consensus round moves each float32 tensor once: parameters, exp_avg and exp_avg_sq for a full
    # save, the parameters alone for a weights-only one
    assert raw["save"]["save_full_moved"]["checkpoint"] == 3 * n * 4
    assert raw["save"]["save_weights_only_moved"]["checkpoint"] == n * 4
    assert raw["save"]["save_full_files"]["n_shards"] == 2
    assert raw["local"]["resume_path"] == "local" and raw["consensus"]["resume_path"] == "consensus"
    assert raw["local"]["optimizer_steps"] == raw["consensus"]["optimizer_steps"] == [3]
