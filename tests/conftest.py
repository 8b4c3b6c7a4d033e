"""Shared fixtures: a tiny real-MNIST dataset, an isolated data cache, and a CLI runner.

End-to-end tests run the real command line in a subprocess, in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_finetuned.py"


def _find_mnist_test() -> Path:
    """The official MNIST test set: $MNIST_TEST_DIR, else ../shared/data/mnist beside the checkout,
    else shared/data/mnist inside it (read from there, never copied into the repository)."""
    candidates = [Path(os.environ["MNIST_TEST_DIR"])] if os.environ.get("MNIST_TEST_DIR") else []
    candidates += [ROOT.parent / "shared" / "data" / "mnist", ROOT / "shared" / "data" / "mnist"]
    return next((c for c in candidates if (c / "t10k-images-idx3-ubyte.gz").exists()), candidates[0])


MNIST_TEST = _find_mnist_test()

# Small and fast: 400 images, 8-channel model, batch 64 -> 6 steps per epoch.
FAST = ["--width", "8", "--batch-size", "64", "--cooldown", "0", "--epochs", "3", "--set", "checkpoint_every_seconds=0"]


def _register_fuzz_profiles() -> None:
    """Hypothesis profiles for tests/test_fuzz.py: ``ci`` (default) runs a bounded, fixed set of
    examples, the same on every run; ``HYPOTHESIS_PROFILE=long`` explores with fresh random examples
    and remembers failures in .hypothesis/. ``FUZZ_EXAMPLES=N`` sets the examples per test in either."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the fuzz tests skip themselves
        return
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    examples = os.environ.get("FUZZ_EXAMPLES")
    settings.register_profile("ci", max_examples=int(examples or 30), derandomize=True, database=None, **common)
    settings.register_profile("long", max_examples=int(examples or 1000), **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_register_fuzz_profiles()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the longest tests first: with two workers (pytest -n 2) they then overlap the many
    short ones instead of running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the user's real data cache."""
    monkeypatch.setenv("CNN_FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "data-cache"))


@pytest.fixture(scope="session")
def tiny_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An IDX images file of 400 real MNIST digits (40 per class) from the built-in sample."""
    from cnn_finetune.data.loader import load_dataset, write_idx

    ds = load_dataset(None, use_cache=False)
    pick = torch.cat([torch.nonzero(ds.labels == c).flatten()[:40] for c in range(10)])
    folder = tmp_path_factory.mktemp("tiny")
    write_idx(folder / "train-images-idx3-ubyte.gz", ds.images[pick, 0].numpy())
    write_idx(folder / "train-labels-idx1-ubyte.gz", ds.labels[pick].numpy().astype(np.uint8))
    return folder / "train-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and batches: one torch thread is fastest, and immune to a second busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def finished_run(args: list[str], factory: pytest.TempPathFactory, name: str) -> Path:
    """Run the CLI to the end in a fresh folder; returns its output folder."""
    work = factory.mktemp(name)
    proc = run_cli([*args, "--output-dir", "out"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "out"


@pytest.fixture(scope="session")
def reference_run(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted FAST run on tiny data: the result every recovered run must reproduce."""
    return finished_run([*FAST, "--data", str(tiny_idx)], tmp_path_factory, "reference")


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: isolated cache, no injected faults unless asked."""
    env = dict(os.environ)
    env.pop("TRAIN_FAULTS", None)
    env["CNN_FINETUNE_CACHE"] = str(tmp / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    # One thread per run: the tiny test model gains nothing from more, and the suite runs two
    # tests at a time (pytest -n 2) on two cores without oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, faults: str | None = None, timeout: float = 300,
            script: Path = SCRIPT, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/train_finetuned.py`` for real and wait for it.

    Runs that inject no fault call the command line in this process (``cli.main``, the same code
    path as the script, minus the interpreter start-up); runs with faults, which signal or kill the
    process, run in a subprocess. ``CLI_SUBPROCESS=1`` sends every run to a subprocess.
    """
    extra = dict(env)
    if faults:
        extra["TRAIN_FAULTS"] = faults
    if not extra and script == SCRIPT and os.environ.get("CLI_SUBPROCESS") != "1":
        return run_cli_in_process(args, cwd)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=cli_env(cwd, **extra),
                          capture_output=True, text=True, timeout=timeout)


def run_cli_in_process(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``cli.main(args)`` in ``cwd`` with the environment of ``cli_env`` (plus ``env``), one torch thread, output captured."""
    import contextlib
    import io

    from cnn_finetune.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    os.environ.clear()
    os.environ.update(cli_env(cwd, **env))
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 gives a subprocess: the same arithmetic, bit for bit
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as stop:  # argparse on a bad flag
                code = stop.code if isinstance(stop.code, int) else 2
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess(["cli.main", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "4m") -> Iterator[Path]:
    """A real small file system at ``folder``, to fill up for real; skips the test where it cannot be mounted."""
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill it for real ({proc.stderr.strip()}); needs root with CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def bomb_png(path: Path) -> Path:
    """A decompression bomb: a 13000 x 13000 1-bit PNG of about 46 KB (169 megapixels, gigabytes once decoded)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (13000, 13000), 1).save(path)
    return path


def load_state(path: Path) -> dict:
    """The verified state inside a checkpoint or model file."""
    from cnn_finetune.files.checkpoint import load_checkpoint

    return load_checkpoint(path)


def stripped_history(out: Path) -> list[dict]:
    """history.json without the fields that legitimately differ between identical runs."""
    from cnn_finetune.training.trainer import TIMING_KEYS

    records = json.loads((out / "history.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    """The model tensors of two checkpoints are equal (bit for bit when atol is 0)."""
    sa, sb = load_state(a)["model"], load_state(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        if atol == 0.0:
            assert torch.equal(sa[k], sb[k]), f"{k} differs"
        else:
            assert torch.allclose(sa[k].double(), sb[k].double(), atol=atol, rtol=0), f"{k} differs by {(sa[k].double() - sb[k].double()).abs().max()}"
