"""The GPU benchmark script must not rot on machines without a GPU: run its CPU path, tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MNIST_TEST

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long
@pytest.mark.skipif(not (MNIST_TEST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"the official MNIST test set is not at {MNIST_TEST} (set MNIST_TEST_DIR)")
def test_gpu_benchmark_script_runs_on_the_cpu_path(tmp_path: Path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MNIST_TEST_DIR=str(MNIST_TEST))
    proc = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "cpu", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu"
    overhead = result["overhead"]
    assert overhead["plain_images_per_s"] > 0 and overhead["robust_images_per_s"] > 0
    assert overhead["ratio"] == overhead["robust_images_per_s"] / overhead["plain_images_per_s"]
    tta = result["tta"]
    assert len(tta["ours"]["curve"]) == 1 and 0.0 < tta["ours"]["final_test_acc"] <= 1.0
    assert len(tta["reference"]["curve"]) == 1 and tta["reference"]["seconds"] > 0
    assert "overhead: ratio" in proc.stdout and "tta: reference, 14 epochs" in proc.stdout
