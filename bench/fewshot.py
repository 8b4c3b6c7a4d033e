"""Few-shot benchmark: does the default command give a good model on a user's small dataset?

    python bench/fewshot.py                     # the full table, about 15 minutes on 2 cores
    python bench/fewshot.py --quick             # tiny sizes: a smoke test that the code still runs
    python bench/fewshot.py --jobs 8 --device cuda --sets mnist10 --sweep 30,60   # research runs

Training sets are built from the official MNIST test set (../shared/data/mnist, or $MNIST_TEST_DIR),
each with a test set of other images of the same file (disjoint from the training images):

  mnist10, mnist30, mnist100   10, 30 and 100 images per digit; tested on the rest of the file
  newscript30                  a "new script" the base model has never seen: the ten digits and the ten
                               digits rotated by 180 degrees as ten new classes (so 6 and a turned 9,
                               or 2 and a turned 2, must be told apart), 30 images per class
  qmnist10, qmnist30, qmnist45, qmnist60, qmnist100 real handwriting of another script: 10, 30, 45, 60 and 100 images of each of the
                               42 Kazakh Cyrillic letters of ../shared/data/qmnist/images (or $QMNIST_DIR),
                               raw 278x278 RGB PNGs linked (not copied) into class folders and read by the
                               real command, so its preprocessing is part of what is measured; tested on
                               the letters' other images (--qmnist-test-per-class, default 170: all of them
                               for qmnist30)
  qmnist30f, mnist30f           label noise of the random kind: qmnist30c and mnist30 with 5% of their training
                               labels moved to another class at random (a fixed draw; test labels right)
  qmnist10c, qmnist30c, qmnist100c the same draws with the source's known label errors corrected: the
                               QazaqMNIST files in the folders of о and к show ө and қ (169 images,
                               2.0% of the letters; ``qmnist_label``): linked under the letter they
                               show, or left out when they are copies of a file of that letter (98)

For each set the real command (scripts/train_finetuned.py, in a subprocess, as a user runs it) trains
with its default length ("default": epochs auto) and with an epoch sweep (15, 30, 60, 120 epochs), both
from scratch (--base-model none) and fine-tuned from the MNIST base model (trained on the built-in
5,000-digit sample, which is disjoint from the MNIST test file). Every run reports test accuracy
(test_evaluation.json, the best-validation model) and the wall time of the whole command. The table
checks the targets of the recipe: the default within 1 point of the best of the sweep and at most 1.5x
its wall time; fine-tuned at least as good as from scratch, and 3 points better at 10 per class.
``--extend 15:60`` adds a row per set: train 15 epochs, then run the same command with --epochs 60
(a finished run is extended), against the direct 60-epoch run.

``--variants fls0.3,fls1.0,fls0.1,frozen,scratch,half,twice --seeds 42,7,1`` runs the recipe sweep
instead (issue 18): named settings (VARIANTS) on every set and seed, reported as mean ± standard
deviation over the seeds and the distance to the best setting of the set. Every finished run is a line
of the .jsonl log next to --out, and runs already there are not run again: a sweep can be cut short,
extended with more seeds or settings, and summarised again.

Writes bench/results/fewshot.json (or --out) and prints a Markdown table (also --markdown FILE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cnn_finetune.config import TrainConfig
from cnn_finetune.data.loader import read_idx, write_idx
from cnn_finetune.files.rundir import BEST

SCRIPT = ROOT / "scripts" / "train_finetuned.py"
MNIST_DIRS = [Path(os.environ["MNIST_TEST_DIR"])] if os.environ.get("MNIST_TEST_DIR") else []
MNIST_DIRS += [d / "shared" / "data" / "mnist" for d in (ROOT.parent, ROOT, ROOT.parents[1])]
SETS = {"mnist10": ("mnist", 10), "mnist30": ("mnist", 30), "mnist100": ("mnist", 100), "newscript30": ("newscript", 30),
        "qmnist10": ("qmnist", 10), "qmnist30": ("qmnist", 30), "qmnist45": ("qmnist", 45), "qmnist60": ("qmnist", 60),
        "qmnist100": ("qmnist", 100),
        # The same draws with the source's known label errors corrected (QAZAQMNIST_SWAPS): same images, other folders.
        "qmnist10c": ("qmnistc", 10), "qmnist30c": ("qmnistc", 30), "qmnist100c": ("qmnistc", 100),
        # Label noise of the random kind: 5% of the training labels of a set with right labels moved to another
        # class at random (the test labels stay right), letters and digits.
        "qmnist30f": ("qmnistc", 30), "mnist30f": ("mnist", 30)}
FLIPPED = {"qmnist30f": 0.05, "mnist30f": 0.05}  # the share of training labels flipped
QMNIST_KINDS = ("qmnist", "qmnistc")  # sets drawn from the QMNIST letters (their test size: --qmnist-test-per-class)
# QMNIST's known label errors (qmnist_label): QazaqMNIST's files in these folders show the other letter.
QAZAQMNIST_SWAPS = {"о": "ө", "к": "қ"}
COMNIST_NAME = re.compile(r"[0-9a-f]{13}\.png")
QMNIST_DIRS = [Path(os.environ["QMNIST_DIR"])] if os.environ.get("QMNIST_DIR") else []
QMNIST_DIRS += [d / "shared" / "data" / "qmnist" / "images" for d in (ROOT.parent, ROOT, ROOT.parents[1])]  # ROOT.parents[1]: a worktree
# The bounds of the automatic length (from a base model: budget_max_epochs is the from-scratch ceiling).
LENGTH_BOUNDS = ("budget_updates", "budget_min_epochs", "budget_max_epochs_finetune", "budget_max_epochs_new_classes")


def scaled_length(factor: float) -> list[str]:
    """The flags that scale every bound of the automatic length by ``factor`` (rounded up), from the defaults."""
    defaults = TrainConfig()
    return [arg for key in LENGTH_BOUNDS for arg in ("--set", f"{key}={math.ceil(factor * getattr(defaults, key))}")]


# Named settings of the recipe sweep (--variants): the base model or none, and the flags of the run.
# "default" is whatever the command does without flags; the others name their factor, so that they
# measure the same thing whatever the default becomes (fls0.3 is the default before issue 18).
# "half" and "twice" scale every bound of the automatic length, so they are half and twice the default
# length whatever the set (the default's epochs hit the fine-tuning ceiling on the 10- and 30-per-class sets).
HALF, TWICE = scaled_length(0.5), scaled_length(2)
VARIANTS = {
    "default": ("base", []),
    "fls0.1": ("base", ["--feature-lr-scale", "0.1"]),
    "fls0.3": ("base", ["--feature-lr-scale", "0.3"]),
    "fls1.0": ("base", ["--feature-lr-scale", "1.0"]),
    "frozen": ("base", ["--freeze-features-epochs", "100000"]),
    "scratch": ("scratch", []),
    # the length of the automatic default, halved and doubled, at the former default factor 0.3
    "half": ("base", ["--feature-lr-scale", "0.3", *HALF]),
    "twice": ("base", ["--feature-lr-scale", "0.3", *TWICE]),
    # the same lengths (and 1.5x) at the default's own (automatic) factor, whatever it is
    "default-half": ("base", HALF),
    "default-twice": ("base", TWICE),
    "default-1.5x": ("base", scaled_length(1.5)),
    # The default before issue 19's calibration part: the whole validation split picks the epoch and fits
    # the temperature (the same models and temperatures as the default runs logged before it).
    "cal0": ("base", ["--set", "calibration_fraction=0"]),
    # The default before clean batch-norm statistics for new scripts: the running averages of the augmented batches.
    "bn-training": ("base", ["--set", "bn_stats=training"]),
    # Half-way, the lowest-margin 5% of the training images stop counting in the loss: always, or never
    # (the default's "auto" decides from the margins whether the labels look noisy).
    "aside-on": ("base", ["--set", "set_aside=on"]),
    "aside-off": ("base", ["--set", "set_aside=off"]),
    # A moving average of the weights (issue 18): the last ~10% of the updates, or ~33% (ema_warmup=4).
    "ema": ("base", ["--feature-lr-scale", "0.3", "--set", "ema_decay=0.999"]),
    "ema-wide": ("base", ["--feature-lr-scale", "0.3", "--set", "ema_decay=0.999", "--set", "ema_warmup=4"]),
    # The model selected by the validation loss (continuous) instead of the accuracy, which a validation split of
    # a few dozen images saturates early: the first of the tied epochs was kept, and patience ran out before the
    # schedule's low-learning-rate end.
    "vloss": ("base", ["--feature-lr-scale", "0.3", "--set", "monitor=val_loss"]),
    "ema-vloss": ("base", ["--feature-lr-scale", "0.3", "--set", "ema_decay=0.999", "--set", "monitor=val_loss"]),
    # issue 18 point 3: elastic distortions (Simard et al. 2003) on top of the default, Simard's strength and a milder one
    "elastic34": ("base", ["--feature-lr-scale", "0.3", "--set", "aug_elastic=34", "--set", "aug_elastic_sigma=4"]),
    "elastic16": ("base", ["--feature-lr-scale", "0.3", "--set", "aug_elastic=16", "--set", "aug_elastic_sigma=4"]),
    "fls1.0-twice": ("base", ["--feature-lr-scale", "1.0", *TWICE]),
    # issue 18 point 3, the rest of the recipe one knob at a time (at the default's factor): regularisation
    # (label smoothing, weight decay), the augmentation's strength, the batch size (more, noisier updates),
    # the head's learning rate, and a factor between 0.3 and 1.0.
    "ls0.2": ("base", ["--feature-lr-scale", "0.3", "--set", "label_smoothing=0.2"]),
    "wd5e-3": ("base", ["--feature-lr-scale", "0.3", "--set", "weight_decay=0.005"]),
    "aug+": ("base", ["--feature-lr-scale", "0.3", "--set", "aug_rotation=20", "--set", "aug_translate=0.15",
                      "--set", "aug_scale=0.2"]),
    "bs64": ("base", ["--feature-lr-scale", "0.3", "--set", "batch_size=64"]),
    "lr6e-3": ("base", ["--feature-lr-scale", "0.3", "--set", "lr=0.006"]),
    "fls0.5": ("base", ["--feature-lr-scale", "0.5"]),
    "fls0.7": ("base", ["--feature-lr-scale", "0.7"]),
    "lr1e-2": ("base", ["--feature-lr-scale", "0.3", "--set", "lr=0.01"]),
    "select-best": ("base", ["--set", "model_selection=best"]),  # the former choice of the kept weights
    # linear probing then fine-tuning (LP-FT, Kumar et al. 2022): the head alone for 5 epochs first
    "lpft5": ("base", ["--feature-lr-scale", "0.3", "--freeze-features-epochs", "5"]),
}


def mnist_folder() -> Path:
    """The folder of the official MNIST test set (the benchmarks' one place to look for it)."""
    folder = next((d for d in MNIST_DIRS if (d / "t10k-images-idx3-ubyte.gz").exists()), None)
    if folder is None:
        raise SystemExit(f"the official MNIST test set is not in {MNIST_DIRS[0]} (set MNIST_TEST_DIR)")
    return folder


def mnist_test_file() -> tuple[np.ndarray, np.ndarray]:
    """The official MNIST test set: images (N, 28, 28) uint8 and labels (N,)."""
    folder = mnist_folder()
    return read_idx(folder / "t10k-images-idx3-ubyte.gz"), read_idx(folder / "t10k-labels-idx1-ubyte.gz")


def qmnist_folder() -> Path:
    """The real Kazakh Cyrillic letters: one folder of raw PNGs per letter."""
    folder = next((d for d in QMNIST_DIRS if d.is_dir()), None)
    if folder is None:
        raise SystemExit(f"the QMNIST letters are not in {QMNIST_DIRS[0]} (set QMNIST_DIR)")
    return folder


def qmnist_label(source: Path, letter: str, file_name: str, corrected: bool) -> str | None:
    """The class folder a QMNIST file is linked into: its own, or with ``corrected`` the letter it shows
    (None: left out, the file is a copy of an image of that letter's folder).

    The letters' images come from two datasets, told apart by their file names: CoMNIST's are 13 hex
    digits, QazaqMNIST's 10 lowercase letters. Looked at one by one, every QazaqMNIST file in the folders
    of о and к (87 and 82 of their 200) shows ө and қ (the letter with the bar, the letter with the tail),
    and the other QazaqMNIST files of shared letters (а, в, с, п, у) show their folder's letter: the
    source labelled ө and қ as о and к. That is 169 of the 8,400 images (2.0%), inside the two pairs
    the models confuse most. 98 of them (48 and 50) are byte-identical copies of a file of the same name
    in the folder of ө or қ: the same image under two labels. ``corrected`` moves the others to the
    letter they show and leaves the copies out.
    """
    if not corrected or letter not in QAZAQMNIST_SWAPS or COMNIST_NAME.fullmatch(file_name):
        return letter
    shown = QAZAQMNIST_SWAPS[letter]
    return None if (source / shown / file_name).exists() else shown


def build_qmnist_set(folder: Path, per_class: int, test_per_class: int, seed: int = 0,
                     corrected: bool = False) -> tuple[Path, Path, int, int]:
    """Class folders of symbolic links to the raw PNGs (nothing is copied): ``per_class`` images of each
    letter for training, up to ``test_per_class`` of the others for testing. The real command reads
    and preprocesses the raw files, so the preprocessing is part of what is measured. ``corrected``:
    the same images, with the source's known label errors in the folder of the letter they show
    (``qmnist_label``)."""
    source = qmnist_folder()
    rng = np.random.default_rng(seed)
    sizes = [0, 0]
    for letter in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(letter.glob("*.png"))
        order = rng.permutation(len(files))
        picked = (order[:per_class], order[per_class:per_class + test_per_class])
        for i, (split, idx) in enumerate(zip(("train", "test"), picked)):
            for j in idx:
                label = qmnist_label(source, letter.name, files[j].name, corrected)
                if label is None:
                    continue
                (folder / split / label).mkdir(parents=True, exist_ok=True)
                (folder / split / label / files[j].name).symlink_to(files[j])
                sizes[i] += 1
    return folder / "train", folder / "test", sizes[0], sizes[1]


def flip_folder_labels(train: Path, share: float, seed: int) -> int:
    """Move ``share`` of the links of the class folders under ``train`` into another class folder, chosen at
    random (a fixed draw of ``seed``); returns how many were moved."""
    rng = np.random.default_rng(seed + 1000)
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    files = sorted(train.glob("*/*.png"))
    picked = rng.choice(len(files), size=int(round(share * len(files))), replace=False)
    for j in sorted(picked.tolist()):
        own = files[j].parent.name
        target = [c for c in classes if c != own][int(rng.integers(len(classes) - 1))]
        files[j].rename(train / target / files[j].name)
    return len(picked)


def flip_array_labels(labels: list[int], share: float, seed: int, num_classes: int) -> list[int]:
    """``labels`` with ``share`` of them replaced by another class at random (a fixed draw of ``seed``)."""
    rng = np.random.default_rng(seed + 1000)
    out = list(labels)
    for j in sorted(rng.choice(len(out), size=int(round(share * len(out))), replace=False).tolist()):
        out[j] = [c for c in range(num_classes) if c != out[j]][int(rng.integers(num_classes - 1))]
    return out


def build_set(name: str, folder: Path, test_per_class: int, seed: int = 0) -> tuple[Path, Path, int, int]:
    """Write the training and test files of a set; returns their paths and sizes."""
    kind, per_class = SETS[name]
    if kind in QMNIST_KINDS:
        built = build_qmnist_set(folder, per_class, test_per_class, seed, corrected=kind == "qmnistc")
        if name in FLIPPED:
            flip_folder_labels(built[0], FLIPPED[name], seed)
        return built
    images, labels = mnist_test_file()
    rng = np.random.default_rng(seed)
    train_x, train_y, test_x, test_y = [], [], [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        groups = [(digit, idx, lambda im: im)]
        if kind == "newscript":
            # The turned digits are other images than the plain ones: no image is in two classes.
            half = len(idx) // 2
            groups = [(digit, idx[:half], lambda im: im), (10 + digit, idx[half:], lambda im: im[:, ::-1, ::-1])]
        for label, pool, transform in groups:
            train_x.append(transform(images[pool[:per_class]]))
            train_y += [label] * per_class
            rest = pool[per_class:per_class + test_per_class]
            test_x.append(transform(images[rest]))
            test_y += [label] * len(rest)
    if name in FLIPPED:
        train_y = flip_array_labels(train_y, FLIPPED[name], seed, 20 if kind == "newscript" else 10)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", np.ascontiguousarray(np.concatenate(xs)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.asarray(ys, dtype=np.uint8))
        paths.append(folder / f"{split}-images-idx3-ubyte.gz")
    return paths[0], paths[1], len(train_y), len(test_y)


def run_command(args: list[str], work: Path, threads: int, timeout: float = 3600, cache: Path | None = None) -> dict[str, Any]:
    """One run of the real command; returns its wall time, exit code, test accuracy and epochs.

    ``cache``: a preprocessed-data cache shared by the runs (the raw PNG sets are decoded once)."""
    out = work / "out"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CNN_FINETUNE_CACHE=str(cache or work / "cache"), PYTHONUNBUFFERED="1")
    env.pop("TRAIN_FAULTS", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--output-dir", str(out), "--num-threads", str(threads)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"seconds": round(seconds, 2), "exit_code": proc.returncode}
    if proc.returncode != 0:
        result["error"] = proc.stderr[-1500:]
        return result
    test = json.loads((out / "test_evaluation.json").read_text())
    history = json.loads((out / "history.json").read_text())
    config = json.loads((out / "config_finetuned.json").read_text())
    result.update({"test_acc": test["accuracy"], "test_ece": test.get("ece"), "test_ece_uncalibrated": test.get("ece_uncalibrated"),
                   "temperature": test.get("temperature"), "epochs_run": len(history), "epochs_planned": config["config"]["epochs"],
                   "best_epoch": test["model"].get("epoch"), "init_note": config["resolved"].get("init"),
                   "automatic": config["resolved"].get("automatic", {}),
                   "feature_lr_scale": config["config"].get("feature_lr_scale")})
    return result


# --- the recipe sweep: named settings (VARIANTS), several seeds, mean and spread ----------------------


def plan_variant_runs(sets: list[str], variants: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Seed by seed (a sweep cut short still has whole seeds), setting by setting in the order given, every set."""
    return [{"set": s, "variant": v, "seed": seed} for seed in seeds for v in variants for s in sets]


def execute_variant(run: dict[str, Any], sets: dict[str, dict[str, Any]], inits: dict[str, str], extra: list[str],
                    work_root: Path, threads: int, log: Path | None, keep: Path | None = None) -> dict[str, Any]:
    """One run of a named setting through the real command; appended to ``log`` as one JSON line.
    ``keep``: a folder where the run's selected model is copied as ``<set>-<setting>-s<seed>.pth``."""
    s = sets[run["set"]]
    init, flags = VARIANTS[run["variant"]]
    name = f"{run['set']}-{run['variant']}-s{run['seed']}"
    work = work_root / name
    work.mkdir(parents=True, exist_ok=True)
    args = ["--data", str(s["train"]), "--test-data", str(s["test"]), "--base-model", inits[init],
            "--seed", str(run["seed"]), *flags, *extra]
    result = run_command(args, work, threads, cache=work_root / "cache")
    if keep is not None and "test_acc" in result:  # the selected model outlives the temporary run folder (bench/fewshot_tta.py)
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "out" / BEST, keep / f"{name}.pth")
    print(f"  {name}: " + (f"test {100 * result['test_acc']:.2f}% in {result['seconds']:.1f} s, {result['epochs_run']} epochs"
                           if "test_acc" in result else f"FAILED ({result['exit_code']}): {result.get('error', '')[-300:]}"),
          flush=True)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(json.dumps({**run, **result}) + "\n")
    return {**run, **result}


def summarize_variants(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per set and setting: mean, sample standard deviation, range of the test accuracy (points), seconds, n."""
    table: dict[str, dict[str, Any]] = {}
    for r in results:
        if "test_acc" in r:
            table.setdefault(r["set"], {}).setdefault(r["variant"], []).append(r)
    for set_name, cells in table.items():
        for variant, rows in cells.items():
            acc = np.array([100 * r["test_acc"] for r in rows])
            cells[variant] = {"mean": float(acc.mean()), "sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                              "min": float(acc.min()), "max": float(acc.max()), "n": len(acc),
                              "seconds": float(np.mean([r["seconds"] for r in rows])),
                              "epochs": float(np.mean([r["epochs_run"] for r in rows])),
                              "seeds": sorted(r["seed"] for r in rows)}
            eces = [100 * r["test_ece"] for r in rows if r.get("test_ece") is not None]
            if eces:  # test ECE after temperature scaling, points (runs logged before it was recorded have none)
                cells[variant].update(ece_mean=float(np.mean(eces)), ece_sd=float(np.std(eces, ddof=1)) if len(eces) > 1 else 0.0,
                                      ece_max=float(np.max(eces)), ece_n=len(eces))
        best = max(cells, key=lambda v: cells[v]["mean"])
        for variant, cell in cells.items():
            cell["minus_best"] = cell["mean"] - cells[best]["mean"]
    return table


def markdown_variants(table: dict[str, dict[str, Any]], variants: list[str]) -> str:
    """Mean ± sd (n seeds) per set and setting, and the distance to the best setting of the set."""
    lines = ["| set | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for set_name, cells in table.items():
        def cell(v: str) -> str:
            c = cells.get(v)
            if c is None:
                return "n/a"
            ece = f"; ECE {c['ece_mean']:.2f} ± {c['ece_sd']:.2f}" if "ece_mean" in c else ""
            return f"{c['mean']:.2f} ± {c['sd']:.2f} (n={c['n']}; {c['minus_best']:+.2f}; {c['seconds']:.0f} s{ece})"
        lines.append(f"| {set_name} | " + " | ".join(cell(v) for v in variants) + " |")
    return "\n".join(lines)


def plan_runs(sets: dict[str, dict[str, Any]], sweep: list[int], inits: dict[str, str], extra: list[str],
              extend: tuple[int, int] | None, seeds: list[int]) -> list[dict[str, Any]]:
    """Every run of the benchmark as a description: set, init, epochs (None: default), seed."""
    runs = []
    for set_name in sets:
        for init in inits:
            for seed in seeds:
                for epochs in [None, *sweep]:
                    runs.append({"set": set_name, "init": init, "epochs": epochs, "seed": seed})
                if extend is not None:
                    runs.append({"set": set_name, "init": init, "epochs": extend[1], "seed": seed, "extend_from": extend[0]})
    return runs


def execute(run: dict[str, Any], sets: dict[str, dict[str, Any]], inits: dict[str, str], extra: list[str],
            work_root: Path, threads: int, log: Path | None = None) -> dict[str, Any]:
    """Run one description (an extension: two commands in one folder) and return it with its results."""
    s = sets[run["set"]]
    name = f"{run['set']}-{run['init']}-{run['epochs'] or 'default'}-s{run['seed']}" + ("-ext" if "extend_from" in run else "")
    work = work_root / name
    work.mkdir(parents=True, exist_ok=True)
    base = ["--data", str(s["train"]), "--test-data", str(s["test"]), "--base-model", inits[run["init"]],
            "--seed", str(run["seed"]), *extra]
    if "extend_from" in run:
        first = run_command([*base, "--epochs", str(run["extend_from"])], work, threads)
        second = run_command([*base, "--epochs", str(run["epochs"])], work, threads)
        result = {**second, "seconds": round(first["seconds"] + second["seconds"], 2), "first_test_acc": first.get("test_acc")}
    else:
        result = run_command(base + ([] if run["epochs"] is None else ["--epochs", str(run["epochs"])]), work, threads)
    print(f"  {name}: " + (f"test {100 * result['test_acc']:.2f}% in {result['seconds']:.1f} s, {result['epochs_run']} epochs"
                           if "test_acc" in result else f"FAILED ({result['exit_code']}): {result.get('error', '')[-300:]}"),
          flush=True)
    if log is not None:  # one line per finished run: a long benchmark cut short keeps what it measured
        with open(log, "a") as fh:
            fh.write(json.dumps({**run, **result}) + "\n")
    return {**run, **result}


def summarize(results: list[dict[str, Any]], sets: list[str], inits: list[str], sweep: list[int]) -> dict[str, Any]:
    """Per set and init: the default, the best of the sweep, and whether the targets hold (seed means)."""
    def mean(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return float(np.mean(values)) if values else None

    table: dict[str, Any] = {}
    for set_name in sets:
        for init in inits:
            rows = [r for r in results if r["set"] == set_name and r["init"] == init and "extend_from" not in r]
            by_epochs = {e: [r for r in rows if r["epochs"] == e] for e in [None, *sweep]}
            cells = {str(e or "default"): {"test_acc": mean(v, "test_acc"), "seconds": mean(v, "seconds"),
                                           "epochs_run": mean(v, "epochs_run")} for e, v in by_epochs.items()}
            swept = [(e, cells[str(e)]) for e in sweep if cells[str(e)]["test_acc"] is not None]
            best_e, best = max(swept, key=lambda item: item[1]["test_acc"]) if swept else (None, None)
            default = cells["default"]
            entry: dict[str, Any] = {"cells": cells, "best_sweep_epochs": best_e}
            if best is not None and default["test_acc"] is not None:
                entry["default_minus_best_points"] = 100 * (default["test_acc"] - best["test_acc"])
                entry["default_time_ratio"] = default["seconds"] / best["seconds"]
                entry["targets_met"] = entry["default_minus_best_points"] >= -1.0 and entry["default_time_ratio"] <= 1.5
            extended = [r for r in results if r["set"] == set_name and r["init"] == init and "extend_from" in r]
            if extended:
                entry["extension"] = {"test_acc": mean(extended, "test_acc"), "first_test_acc": mean(extended, "first_test_acc"),
                                      "seconds": mean(extended, "seconds"), "from": extended[0]["extend_from"],
                                      "to": extended[0]["epochs"]}
            table[f"{set_name}/{init}"] = entry
    for set_name in sets:
        scratch, base = table.get(f"{set_name}/scratch"), table.get(f"{set_name}/base")
        if scratch and base and scratch["cells"]["default"]["test_acc"] is not None and base["cells"]["default"]["test_acc"] is not None:
            gain = 100 * (base["cells"]["default"]["test_acc"] - scratch["cells"]["default"]["test_acc"])
            base["finetune_gain_points"] = gain
    return table


def markdown(table: dict[str, Any], sweep: list[int]) -> str:
    """The summary as a Markdown table: test accuracy and seconds per setting."""
    head = "| set / start | default | " + " | ".join(f"{e} epochs" for e in sweep) + " | default vs best | time ratio | fine-tuning gain |"
    lines = [head, "|" + "---|" * (len(sweep) + 5)]
    for key, entry in table.items():
        def cell(c: dict[str, Any]) -> str:
            if c["test_acc"] is None:
                return "n/a"
            return f"{100 * c['test_acc']:.2f}% ({c['seconds']:.0f} s, {c['epochs_run']:.0f} ep)"
        cells = [cell(entry["cells"]["default"])] + [cell(entry["cells"][str(e)]) for e in sweep]
        diff = entry.get("default_minus_best_points")
        ratio = entry.get("default_time_ratio")
        gain = entry.get("finetune_gain_points")
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {'n/a' if diff is None else f'{diff:+.2f} pt'} | "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {'' if gain is None else f'{gain:+.2f} pt'} |")
    extensions = [(k, e["extension"]) for k, e in table.items() if "extension" in e]
    if extensions:
        lines += ["", "| set / start | after the first run | extended | seconds (both runs) |", "|---|---|---|---|"]
        for key, ext in extensions:
            lines.append(f"| {key} | {ext['from']} epochs: {100 * ext['first_test_acc']:.2f}% | to {ext['to']} epochs: "
                         f"{100 * ext['test_acc']:.2f}% | {ext['seconds']:.0f} s |")
    return "\n".join(lines)


def base_model(args: argparse.Namespace, work_root: Path, threads: int) -> str:
    """The MNIST base model: --base-model, else the one shipped in the package, else trained here."""
    if args.base_model:
        return str(Path(args.base_model).resolve())
    from cnn_finetune.config import packaged_base_model

    shipped = packaged_base_model()
    if shipped is not None:
        return str(shipped)
    work = work_root / "base"
    work.mkdir(parents=True, exist_ok=True)
    result = run_command(["--base-model", "none"] + (["--epochs", "1"] if args.quick else []), work, threads)
    if result["exit_code"] != 0:
        raise SystemExit(f"training the base model failed: {result.get('error')}")
    return str(work / "out" / "best_model_finetuned.pth")


def write_report(args: argparse.Namespace, report: dict[str, Any], text: str, results: list[dict[str, Any]]) -> int:
    """Write the JSON report and the optional markdown table, print the table; 1 when a run failed."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + text + f"\n\n{len(results)} runs in {report['seconds']:.0f} s; written to {args.out}")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0 if all("test_acc" in r for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    p.add_argument("--sweep", default="15,30,60,120", help="epoch counts of the sweep")
    p.add_argument("--inits", default="scratch,base", help="scratch and/or base")
    p.add_argument("--seeds", default="42", help="comma-separated seeds (results are averaged)")
    p.add_argument("--test-per-class", type=int, default=300, help="test images per class (default 300)")
    p.add_argument("--extend", default="15:60", help="FROM:TO extension rows ('' for none)")
    p.add_argument("--base-model", help="base model file (default: the packaged one, else trained on the built-in sample)")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (wall times are only comparable with 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--extra", default="", help="more arguments for every run, e.g. '--device cuda --set amp=off'")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fewshot.json")
    p.add_argument("--markdown", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--variants", default="", help="the recipe sweep instead of the epoch sweep: comma-separated settings of "
                   + ", ".join(VARIANTS) + "; runs already in the --out .jsonl log are not run again")
    p.add_argument("--keep-models", type=Path, help="--variants: copy each run's selected model into this folder "
                   "(for bench/fewshot_tta.py, which evaluates them with and without test-time augmentation)")
    p.add_argument("--qmnist-test-per-class", type=int, default=170, help="test images per letter of the qmnist sets (default 170)")
    args = p.parse_args(argv)
    if args.variants:
        return main_variants(args)
    sweep = [int(e) for e in args.sweep.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    extend = tuple(int(v) for v in args.extend.split(":")) if args.extend else None
    set_names = [s for s in args.sets.split(",") if s]
    if args.quick:
        sweep, set_names, extend, args.test_per_class = [1, 2], set_names[:1], (1, 2), 20
        # The default row too: epochs auto within 1 to 3 epochs.
        args.extra += " --set budget_updates=2 --set budget_min_epochs=1 --set budget_max_epochs=3"
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fewshot-") as tmp:
        work_root = Path(tmp)
        inits = {"scratch": "none", "base": base_model(args, work_root, threads)}
        inits = {k: v for k, v in inits.items() if k in args.inits.split(",")}
        sets = {}
        for name in set_names:
            train, test, n_train, n_test = build_set(name, work_root / "data" / name, args.test_per_class)
            sets[name] = {"train": train, "test": test, "train_images": n_train, "test_images": n_test}
            print(f"{name}: {n_train} training images, {n_test} test images", flush=True)
        runs = plan_runs(sets, sweep, inits, args.extra.split(), extend, seeds)
        # Longest first: with several jobs, the short runs then fill the gaps at the end.
        runs.sort(key=lambda r: -(r["epochs"] or 300) * sets[r["set"]]["train_images"])
        print(f"{len(runs)} runs, {args.jobs} at a time, {threads} thread(s) each", flush=True)
        log = args.out.with_suffix(".jsonl")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda r: execute(r, sets, inits, args.extra.split(), work_root, threads, log), runs))
    table = summarize(results, set_names, list(inits), sweep)
    report = {"environment": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                              "jobs": args.jobs, "threads": threads, "extra": args.extra},
              "sets": {k: {"train_images": v["train_images"], "test_images": v["test_images"]} for k, v in sets.items()},
              "sweep": sweep, "seeds": seeds, "seconds": round(time.perf_counter() - t_start, 1),
              "summary": table, "runs": results}
    return write_report(args, report, markdown(table, sweep), results)


def main_variants(args: argparse.Namespace) -> int:
    """The recipe sweep (--variants): every set x setting x seed, mean and spread per cell."""
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    set_names = [s for s in args.sets.split(",") if s]
    extra = args.extra.split()
    if args.quick:
        set_names, args.test_per_class, args.qmnist_test_per_class = set_names[:1], 20, 5
        extra += ["--epochs", "2"]
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    log = args.out.with_suffix(".jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    unique: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in done:  # the first measurement of each (set, setting, seed) counts
        if "variant" in r and "test_acc" in r:
            unique.setdefault((r["set"], r["variant"], r["seed"]), r)
    done = list(unique.values())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fewshot-") as tmp:
        work_root = Path(tmp)
        inits = {"scratch": "none", "base": base_model(args, work_root, threads)}
        sets = {}
        for name in set_names:
            per_test = args.qmnist_test_per_class if SETS[name][0] in QMNIST_KINDS else args.test_per_class
            train, test, n_train, n_test = build_set(name, work_root / "data" / name, per_test)
            sets[name] = {"train": train, "test": test, "train_images": n_train, "test_images": n_test}
            print(f"{name}: {n_train} training images, {n_test} test images", flush=True)
        have = {(r["set"], r["variant"], r["seed"]) for r in done}
        runs = [r for r in plan_variant_runs(set_names, variants, seeds) if (r["set"], r["variant"], r["seed"]) not in have]
        print(f"{len(runs)} runs ({len(have)} already in {log}), {args.jobs} at a time, {threads} thread(s) each", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda r: execute_variant(r, sets, inits, extra, work_root, threads, log, args.keep_models),
                                    runs))
    wanted = [r for r in done + results if r["set"] in set_names and r["variant"] in variants and r["seed"] in seeds]
    table = summarize_variants(wanted)
    report = {"environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "jobs": args.jobs,
                              "threads": threads, "extra": args.extra},
              "sets": {k: {"train_images": v["train_images"], "test_images": v["test_images"]} for k, v in sets.items()},
              "variants": {v: VARIANTS[v] for v in variants}, "seeds": seeds,
              "seconds": round(time.perf_counter() - t_start, 1), "summary": table, "runs": wanted}
    return write_report(args, report, markdown_variants(table, variants), results)


if __name__ == "__main__":
    sys.exit(main())
