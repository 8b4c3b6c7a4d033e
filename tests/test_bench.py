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


@pytest.mark.long
@pytest.mark.skipif(not (MNIST_TEST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"the official MNIST test set is not at {MNIST_TEST} (set MNIST_TEST_DIR)")
def test_fewshot_benchmark_fills_its_table(tmp_path: Path):
    """The quick path of bench/fewshot.py: every cell of the summary holds a measurement (a run's
    own fields must not overwrite the description it is summarised by)."""
    out = tmp_path / "fewshot.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MNIST_TEST_DIR=str(MNIST_TEST))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fewshot.py"), "--quick", "--jobs", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(report["summary"]) == ["mnist10/base", "mnist10/scratch"]
    for key, entry in report["summary"].items():
        for name, cell in entry["cells"].items():
            assert cell["test_acc"] is not None and 0.0 < cell["test_acc"] <= 1.0, (key, name)
            assert cell["seconds"] > 0 and cell["epochs_run"] >= 1, (key, name)
        assert entry["extension"]["from"] == 1 and entry["extension"]["to"] == 2
        assert "default_minus_best_points" in entry and "default_time_ratio" in entry
    assert "finetune_gain_points" in report["summary"]["mnist10/base"]
    assert {r["init"] for r in report["runs"]} == {"scratch", "base"}
    assert all(r["init_note"].startswith(("fine-tuning from", "training from scratch")) for r in report["runs"]), \
        [r["init_note"] for r in report["runs"]]
    assert "| mnist10/base |" in proc.stdout and "n/a" not in proc.stdout
