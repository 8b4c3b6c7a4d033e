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


QMNIST = next((d for d in ([Path(os.environ["QMNIST_DIR"])] if os.environ.get("QMNIST_DIR") else [])
               + [p / "shared" / "data" / "qmnist" / "images" for p in (ROOT.parent, ROOT, ROOT.parents[1])] if d.is_dir()), None)


@pytest.mark.long
@pytest.mark.skipif(QMNIST is None, reason="the QMNIST letters are not in ../shared/data/qmnist/images (set QMNIST_DIR)")
def test_fewshot_recipe_sweep_reads_the_raw_letters_and_resumes_from_its_log(tmp_path: Path):
    """--variants on a qmnist set: raw PNG class folders through the real command, one JSON line per run,
    and a second call runs nothing that its log already holds."""
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(ROOT / "bench" / "fewshot.py"), "--quick", "--variants", "fls0.3,frozen", "--sets", "qmnist10",
           "--seeds", "42", "--jobs", "2", "--threads", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", QMNIST_DIR=str(QMNIST))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sets"]["qmnist10"] == {"train_images": 420, "test_images": 42 * 5}  # --quick: 5 test images per letter
    cells = report["summary"]["qmnist10"]
    assert sorted(cells) == ["fls0.3", "frozen"] and all(c["n"] == 1 and 0 <= c["mean"] <= 100 for c in cells.values()), cells
    assert max(c["minus_best"] for c in cells.values()) == 0.0
    # fls0.3: its own factor; frozen: the automatic factor of new classes (no effect while the features are frozen)
    assert sorted(r["feature_lr_scale"] for r in report["runs"]) == [0.3, 0.7]
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 2
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "0 runs (2 already in" in again.stdout
    assert json.loads(out.read_text())["summary"] == report["summary"]


@pytest.mark.long
@pytest.mark.skipif(not (MNIST_TEST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"the official MNIST test set is not at {MNIST_TEST} (set MNIST_TEST_DIR)")
def test_fewshot_keeps_its_models_and_the_tta_bench_evaluates_them_with_and_without(tmp_path: Path):
    """--keep-models copies each run's selected model; bench/fewshot_tta.py rebuilds the same test set
    (its plain accuracy is the run's own test accuracy) and evaluates it again with --tta."""
    out, models = tmp_path / "sweep.json", tmp_path / "models"
    env = dict(os.environ, OMP_NUM_THREADS="1", MNIST_TEST_DIR=str(MNIST_TEST))
    cmd = [sys.executable, str(ROOT / "bench" / "fewshot.py"), "--quick", "--variants", "fls0.3,elastic16", "--sets", "mnist10",
           "--seeds", "42", "--jobs", "2", "--threads", "1", "--out", str(out), "--keep-models", str(models)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert sorted(p.name for p in models.iterdir()) == ["mnist10-elastic16-s42.pth", "mnist10-fls0.3-s42.pth"]
    tta_out = tmp_path / "tta.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fewshot_tta.py"), "--models", str(models), "--out", str(tta_out),
                           "--test-per-class", "20"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(tta_out.read_text())["runs"]}
    assert sorted(rows) == ["elastic16", "fls0.3"]
    for variant, row in rows.items():
        assert row["plain_acc"] == runs[variant]["test_acc"] and 0.0 < row["tta_acc"] <= 1.0
    assert "| mnist10 | fls0.3 |" in proc.stdout


@pytest.mark.long
@pytest.mark.skipif(not (MNIST_TEST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"the official MNIST test set is not at {MNIST_TEST} (set MNIST_TEST_DIR)")
def test_builtin_bench_times_both_whole_processes_and_reads_the_test_accuracy(tmp_path: Path):
    """bench/builtin.py --quick: the reference recipe and the command each run as a process of their own;
    the ratio is the command's wall time over the reference's, and the accuracy the model file's."""
    out = tmp_path / "builtin.json"
    env = dict(os.environ, MNIST_TEST_DIR=str(MNIST_TEST))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "builtin.py"), "--quick", "--seeds", "3", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["epochs"] == 1 and run["seed"] == 3 and 0.5 < run["test_acc"] <= 1.0
    assert 0.5 < run["reference"]["test_acc"] <= 1.0 and run["reference"]["seconds"] > run["reference"]["train_seconds"] > 0
    assert run["ratio"] == round(run["seconds"] / run["reference"]["seconds"], 3)
    assert report["summary"]["default"]["target_met"] is False  # one epoch reaches neither 99.3% nor anything useful
    assert "default: " in proc.stdout and "target (>= 99.3% in <= 0.8x): not met" in proc.stdout


@pytest.mark.skipif(QMNIST is None, reason="the QMNIST letters are not in ../shared/data/qmnist/images (set QMNIST_DIR)")
def test_the_corrected_letters_move_the_source_errors_and_keep_the_draw(tmp_path: Path):
    """qmnist30c: the same draw as qmnist30, with QazaqMNIST's files of о and к under ө and қ, and the
    copies of a file of ө or қ left out; every other letter's folders are the same links."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fewshot

    plain = fewshot.build_set("qmnist30", tmp_path / "plain", 170)
    fixed = fewshot.build_set("qmnist30c", tmp_path / "fixed", 170)
    assert plain[2:] == (1260, 7140) and fixed[2:] == (1244, 7058)

    def names(root: Path, letter: str) -> set[str]:
        return {p.name for p in (root / letter).iterdir()}

    for split in (0, 1):
        a, b = plain[split], fixed[split]
        for letter in sorted(p.name for p in a.iterdir()):
            if letter not in ("о", "ө", "к", "қ"):
                assert names(a, letter) == names(b, letter), letter
        for wrong, shown in (("о", "ө"), ("к", "қ")):
            moved = names(b, shown) - names(a, shown)
            assert moved and moved <= names(a, wrong) and not any(fewshot.COMNIST_NAME.fullmatch(n) for n in moved)
            assert all(fewshot.COMNIST_NAME.fullmatch(n) for n in names(b, wrong))  # only CoMNIST's own о and к stay
            assert not any((QMNIST / shown / n).exists() for n in names(a, wrong) & (names(b, shown) - names(a, shown)))
