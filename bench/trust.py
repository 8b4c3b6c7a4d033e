"""What a run tells the user besides the model: the label review, calibration, "unknown", the report.

    python bench/trust.py                       # every section (about 20 minutes on 2 busy cores)
    python bench/trust.py --only unknown,report # some sections
    python bench/trust.py --quick               # tiny sizes: a smoke test that the code still runs

Sections (each runs the real command, scripts/train_finetuned.py, in a subprocess, as a user does):

  labels       QMNIST, 30 images per letter for training (42 letters, fixed seed), the other 170 per
               letter for the test. The default command once on the clean set and once with 5% of the
               training labels flipped at random (each flipped image moved into another letter's
               folder). Target: at least 60% of the flipped images in the top 2 x 5% of
               label_review.csv; the test accuracy of both runs side by side.
  cleanup      the source's own label errors (169 QazaqMNIST images in the folders of о and к show ө and
               қ; fewshot.qmnist_label), on fewshot.py's qmnist30 draw, seeds --seeds: where the default
               run's label_review.csv ranks the ones in its training split, and the test accuracy of the
               same command rerun without the images the review scores below 0 (at most its first 5%: what a
               user who drops the review's negative rows gets), on the test folder as it is and with its labels corrected.
  calibration  test ECE after temperature scaling against the unscaled one, on the QMNIST run of
               ``labels`` and on the built-in sample's model (test: the official MNIST test set).
               Target: scaled at most half the unscaled and at most 3%.
  unknown      the built-in sample's model: calibrated confidence, feature distance and the model's
               "unknown" rule (either check) on the MNIST test images against blank images, uniform
               noise and QMNIST letters (another script). AUROC of each (target at least 0.9 for
               blank and noise) and the share of each rejected at the model's thresholds.
  report       report.html for 62 classes: size (target under 5 MB) and time to write (under 2 s).
  tracking     what the margin tracking costs: RobustTrainer.fit on the built-in sample with the
               tracker against the same fit with a tracker that does nothing (interleaved runs).

Writes bench/results/trust.json (or --out) and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from fewshot import build_qmnist_set, mnist_folder, qmnist_folder, qmnist_label  # noqa: E402  (the benchmarks' data)

SCRIPT = ROOT / "scripts" / "train_finetuned.py"
EVALUATE = ROOT / "scripts" / "evaluate.py"
SECTIONS = ("labels", "cleanup", "calibration", "unknown", "report", "tracking", "tracking_ops")


def qmnist_sets(work: Path, per_class: int, flip_share: float, seed: int = 0) -> dict[str, Any]:
    """Symlinked class folders (nothing copied): train (per_class per letter), train_flipped, test (the rest)."""
    rng = np.random.default_rng(seed)
    qmnist = qmnist_folder()
    letters = sorted(p.name for p in qmnist.iterdir() if p.is_dir())
    train = []
    for letter in letters:
        files = sorted((qmnist / letter).glob("*.png"))
        order = rng.permutation(len(files))
        for k, i in enumerate(order):
            part = "train" if k < per_class else "test"
            (work / part / letter).mkdir(parents=True, exist_ok=True)
            (work / part / letter / files[i].name).symlink_to(files[i])
            if part == "train":
                train.append((letter, files[i]))
    flips = rng.choice(len(train), size=int(round(flip_share * len(train))), replace=False)
    flipped = {}
    for j, (letter, file) in enumerate(train):
        target = letter
        if j in set(flips.tolist()):
            target = letters[(letters.index(letter) + rng.integers(1, len(letters))) % len(letters)]
            flipped[str(work / "train_flipped" / target / file.name)] = letter
        (work / "train_flipped" / target).mkdir(parents=True, exist_ok=True)
        (work / "train_flipped" / target / file.name).symlink_to(file)
    return {"train": work / "train", "flipped": work / "train_flipped", "test": work / "test", "flipped_files": flipped,
            "num_train": len(train), "letters": len(letters)}


def run_default(args: list[str], work: Path, out: str) -> dict[str, Any]:
    """The default command (epochs auto) with ``args``; returns its wall time and the evaluations."""
    env = {**os.environ, "CNN_FINETUNE_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--output-dir", out], cwd=work, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the command failed ({proc.returncode}): {proc.stderr[-3000:]}")
    folder = work / out
    test = json.loads((folder / "test_evaluation.json").read_text()) if (folder / "test_evaluation.json").exists() else None
    history = json.loads((folder / "history.json").read_text())
    return {"seconds": round(seconds, 1), "epochs": len(history), "folder": str(folder),
            "test_accuracy": test and test["accuracy"], "test_ece": test and test["ece"],
            "test_ece_uncalibrated": test and test["ece_uncalibrated"], "temperature": test and test["temperature"],
            "report_bytes": (folder / "report.html").stat().st_size}


def section_labels(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import csv

    sets = qmnist_sets(work / "qmnist", 8 if args.quick else 30, 0.05)
    extra = ["--epochs", "3"] if args.quick else []  # the default command: its auto length
    clean = run_default(["--data", str(sets["train"]), "--test-data", str(sets["test"]), *extra], work, "clean")
    flipped = run_default(["--data", str(sets["flipped"]), "--test-data", str(sets["test"]), *extra], work, "flipped")
    with open(Path(flipped["folder"]) / "label_review.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    ranked = [r["image"] for r in rows]
    in_train = [p for p in sets["flipped_files"] if p in set(ranked)]  # the others went to the validation split
    top = set(ranked[: int(round(2 * 0.05 * len(ranked)))])
    found = sum(p in top for p in in_train)
    return {"train_images": sets["num_train"], "letters": sets["letters"], "flipped": len(sets["flipped_files"]),
            "flipped_in_training_split": len(in_train), "reviewed_rows": len(ranked), "top_rows": len(top),
            "flipped_in_top": found, "recall_in_top_2x5pct": found / max(len(in_train), 1), "target": 0.6,
            "clean": clean, "with_flips": flipped}


def section_cleanup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import csv

    per_class, per_test = (8, 5) if args.quick else (30, 170)
    base = work / "cleanup"
    train, test, _, _ = build_qmnist_set(base / "asis", per_class, per_test)
    test_fixed = build_qmnist_set(base / "corrected", per_class, per_test, corrected=True)[1]
    extra = ["--epochs", "3"] if args.quick else []
    env = {**os.environ, "CNN_FINETUNE_CACHE": str(work / "cache")}

    def corrected_accuracy(folder: Path) -> float:
        out = folder / "eval_corrected"
        proc = subprocess.run([sys.executable, str(EVALUATE), "--model", str(folder / "best_model_finetuned.pth"),
                               "--data", str(test_fixed), "--output-dir", str(out)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"evaluate failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return float(json.loads((out / "evaluation.json").read_text())["accuracy"])

    source = qmnist_folder()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        first = run_default(["--data", str(train), "--test-data", str(test), "--seed", str(seed), *extra], work, f"asis-s{seed}")
        with open(Path(first["folder"]) / "label_review.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        # A row's image is the path the run read: <train>/<letter>/<file>; the known errors are the files
        # whose corrected letter is another than their folder's.
        known = {int(r["rank"]) for r in rows
                 if qmnist_label(source, Path(r["image"]).parent.name, Path(r["image"]).name, True) != Path(r["image"]).parent.name}
        # The rows are most suspect first; at most 5% go (a short --quick run scores nearly every image below 0).
        dropped = {r["image"] for r in rows[: len(rows) // 20] if r["score"] != "" and float(r["score"]) < 0}
        kept = base / f"reviewed-s{seed}"
        for image in sorted(p for p in train.glob("*/*") if str(p) not in dropped):
            (kept / image.parent.name).mkdir(parents=True, exist_ok=True)
            (kept / image.parent.name / image.name).symlink_to(image.resolve())
        second = run_default(["--data", str(kept), "--test-data", str(test), "--seed", str(seed), *extra], work, f"reviewed-s{seed}")
        runs.append({"seed": seed, "reviewed_rows": len(rows), "known_errors_reviewed": len(known), "known_error_ranks": sorted(known),
                     "negative_rows": len(dropped),
                     "known_errors_negative": sum(1 for r in rows if r["image"] in dropped and int(r["rank"]) in known),
                     "as_is": {**first, "test_accuracy_corrected": corrected_accuracy(Path(first["folder"]))},
                     "without_negative": {**second, "test_accuracy_corrected": corrected_accuracy(Path(second["folder"]))}})
    def mean_sd(key: str, sub: str) -> list[float]:
        v = np.array([100 * r[key][sub] for r in runs])
        return [round(float(v.mean()), 2), round(float(v.std(ddof=1)), 2) if len(v) > 1 else 0.0]
    summary = {k: {sub: mean_sd(k, sub) for sub in ("test_accuracy", "test_accuracy_corrected")} for k in ("as_is", "without_negative")}
    return {"per_class": per_class, "summary": summary, "runs": runs}


def section_calibration(args: argparse.Namespace, work: Path, labels: dict[str, Any] | None) -> dict[str, Any]:
    extra = ["--epochs", "2"] if args.quick else []
    sample = run_default(["--test-data", str(mnist_folder() / "t10k-images-idx3-ubyte.gz"), *extra], work, "sample")
    out = {"builtin_sample": sample, "target": "ece <= ece_uncalibrated / 2 and ece <= 0.03"}
    if labels is not None:
        out["qmnist30"] = labels["clean"]
    return out


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(confidence of an in-distribution image > that of an outside one), ties counted half."""
    b = np.sort(outside)
    less = np.searchsorted(b, inside, side="left")
    equal = np.searchsorted(b, inside, side="right") - less
    return float((less + 0.5 * equal).sum() / (len(inside) * len(outside)))


def section_unknown(args: argparse.Namespace, work: Path, model_path: Path) -> dict[str, Any]:
    """Confidence, feature distance and the model's rule (unknown when EITHER says so) on the MNIST test
    digits against blank, noise and QMNIST letters. The rule's own score, for its AUROC, is
    ``max(log(threshold / confidence), log(distance / distance threshold))``: over 0 exactly when the
    rule answers unknown, and ordered by how far past its threshold the more decided check is."""
    from cnn_finetune import load_dataset, load_model_file
    from cnn_finetune.tools.inference import model_polarity, predict_with_unknown

    model, meta = load_model_file(model_path)
    n = 200 if args.quick else 2000
    g = torch.Generator().manual_seed(0)
    inside = load_dataset(mnist_folder() / "t10k-images-idx3-ubyte.gz", cache_dir=work / "cache").images
    kinds = {"blank": torch.zeros((n, 1, 28, 28), dtype=torch.uint8),
             "noise": torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
             "letters (QMNIST)": load_dataset(qmnist_folder(), polarity=model_polarity(meta), cache_dir=work / "cache").images[:: 4 if args.quick else 1]}

    def signals(images: torch.Tensor) -> dict[str, np.ndarray]:
        a = predict_with_unknown(model, meta, images)
        conf, unknown = a.confidence.double().numpy(), a.unknown.numpy()
        out = {"confidence": conf, "unknown": unknown,
               "confidence_rejects": conf < a.min_confidence}
        if a.distance is not None:
            dist = a.distance.numpy()
            out.update(distance=dist, distance_rejects=dist > a.max_distance,
                       rule=np.maximum(np.log(a.min_confidence / np.maximum(conf, 1e-300)) if a.min_confidence > 0
                                       else -np.inf, np.log(np.maximum(dist, 1e-300) / a.max_distance)))
        return out

    a = predict_with_unknown(model, meta, inside[:1])
    s_in = signals(inside)
    out: dict[str, Any] = {"confidence_threshold": a.min_confidence, "distance_threshold": a.max_distance,
                           "num_inside": len(inside), "target": "AUROC >= 0.9 against blank and noise (the rule)",
                           "mnist_test_rejected": float(s_in["unknown"].mean()),
                           "mnist_test_rejected_by_confidence": float(s_in["confidence_rejects"].mean())}
    if "distance" in s_in:
        out["mnist_test_rejected_by_distance"] = float(s_in["distance_rejects"].mean())
    for name, images in kinds.items():
        s = signals(images)
        row = {"images": len(images), "rejected": float(s["unknown"].mean()),
               "auroc_confidence": auroc(s_in["confidence"], s["confidence"]),
               "rejected_by_confidence": float(s["confidence_rejects"].mean())}
        if "distance" in s:
            row.update(auroc_distance=auroc(-s_in["distance"], -s["distance"]), auroc_rule=auroc(-s_in["rule"], -s["rule"]),
                       rejected_by_distance=float(s["distance_rejects"].mean()))
        out[name] = row
    return out


def section_report(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from cnn_finetune.tools.calibration import calibration_report
    from cnn_finetune.tools.evaluate import metrics_from_confusion, write_reports
    from cnn_finetune.tools.report import ReportInputs, write_report

    classes = [f"class_{i:02d}" for i in range(62)]
    n = 62 * 20
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 62
    logits = torch.randn(n, 62, generator=g) + 4 * torch.nn.functional.one_hot(labels, 62)
    preds = logits.argmax(1)
    probs = torch.softmax(logits, 1)
    ev = metrics_from_confusion(torch.bincount(labels * 62 + preds, minlength=62 * 62).reshape(62, 62), classes)
    ev.update(calibration_report(logits, labels, 1.0), predictions=preds.tolist(),
              confidences=probs.max(1).values.tolist(), label_probabilities=probs.gather(1, labels[:, None]).squeeze(1).tolist())
    out_dir = work / "report62"
    t0 = time.perf_counter()
    write_reports(ev, out_dir)
    pictures = time.perf_counter() - t0
    review = [{"rank": i + 1, "image": f"data/{classes[i % 62]}/img{i}.png", "index": i, "given_label": classes[i % 62],
               "predicted_label": classes[(i + 1) % 62], "score": -1.0 + i / 100} for i in range(50)]
    history = [{"epoch": e, "events": [{"type": "resumed", "from": "checkpoint_last.pth"}] if e == 3 else []} for e in range(1, 31)]
    t0 = time.perf_counter()
    write_report(out_dir / "report.html", ReportInputs("62 classes", ev, images, labels, classes, history, review, images,
                                                       {"confusion": out_dir / "confusion_matrix.png",
                                                        "reliability": out_dir / "reliability_diagram.png"}))
    seconds = time.perf_counter() - t0
    return {"classes": 62, "images": n, "bytes": (out_dir / "report.html").stat().st_size, "write_seconds": seconds,
            "pictures_seconds": pictures, "target": "under 5 MB and 2 s"}


def section_tracking(args: argparse.Namespace) -> dict[str, Any]:
    import suite
    from cnn_finetune import TrainConfig
    from cnn_finetune.training import step

    class NoTracker(step.MarginTracker):
        def observe(self, *a: Any) -> None: ...
        def commit(self, *a: Any) -> None: ...

    cfg = replace(TrainConfig(), epochs=1 if args.quick else 3, device="cpu")
    data = suite.split_data(cfg, args.quick)
    runs: dict[str, list[float]] = {"tracked": [], "untracked": []}
    for _ in range(1 if args.quick else 2):  # interleaved, so that both see the same machine load
        for name in ("untracked", "tracked"):
            saved = step.MarginTracker
            step.MarginTracker = NoTracker if name == "untracked" else saved
            try:
                runs[name].append(suite.robust_run(cfg, data, torch.device("cpu"))[0]["images_per_s"])
            finally:
                step.MarginTracker = saved
    best = {k: max(v) for k, v in runs.items()}
    return {"images_per_s": runs, "ratio": best["tracked"] / best["untracked"], "target": 0.98,
            "note": "best of interleaved RobustTrainer.fit runs on the built-in sample, default settings"}


def section_tracking_ops(args: argparse.Namespace) -> dict[str, Any]:
    """The tracker's own operations (margins, index_add_ of sums and counts) against one training step's
    forward and backward pass of the default model on a batch of the default size, timed in this process."""
    from cnn_finetune import TrainConfig
    from cnn_finetune.model.cnn import build_model
    from cnn_finetune.training.label_review import MarginTracker

    cfg = TrainConfig()
    torch.manual_seed(0)
    model = build_model(10, width=cfg.width, bn_ghost_size=cfg.bn_ghost_size).train()
    x, y = torch.randn(cfg.batch_size, 1, 28, 28), torch.randint(0, 10, (cfg.batch_size,))
    idx = torch.randperm(4500)[: cfg.batch_size]
    tracker = MarginTracker(4500, "cpu")
    good = torch.tensor(True)

    def step() -> torch.Tensor:
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        return logits

    def track(logits: torch.Tensor) -> None:
        tracker.observe(idx, logits, y)
        tracker.commit(good)

    logits = step()
    reps = 5 if args.quick else 30
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    step_s = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps * 20):
        track(logits)
    track_s = (time.perf_counter() - t0) / (reps * 20)
    return {"step_ms": 1000 * step_s, "tracking_ms": 1000 * track_s, "share": track_s / step_s, "target": 0.02,
            "batch": cfg.batch_size, "width": cfg.width,
            "note": "forward+backward only (no optimizer step, no augmentation): the share is an upper bound"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the benchmark still runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trust.json")
    p.add_argument("--seeds", default="42,7,1", help="cleanup: the run seeds (default 42,7,1)")
    p.add_argument("--work", type=Path, help="keep the runs in this folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    only = args.only.split(",")
    out = args.out
    # A run of some sections keeps the numbers of the others from the last run that wrote the file.
    earlier = json.loads(out.read_text()) if out.exists() and not args.quick else {}
    results: dict[str, Any] = {**earlier, "quick": args.quick}

    def keep(name: str, value: dict[str, Any]) -> None:  # written after every section: a long run keeps what it measured
        results[name] = value
        print(json.dumps({name: value}, indent=1, ensure_ascii=False), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) if args.work is None else args.work
        work.mkdir(parents=True, exist_ok=True)
        if "report" in only:
            keep("report", section_report(args, work))
        if "calibration" in only or "unknown" in only:
            keep("calibration", section_calibration(args, work, None))
        if "unknown" in only:
            model = Path(results["calibration"]["builtin_sample"]["folder"]) / "best_model_finetuned.pth"
            keep("unknown", section_unknown(args, work, model))
        if "tracking_ops" in only:
            keep("tracking_ops", section_tracking_ops(args))
        if "tracking" in only:
            keep("tracking", section_tracking(args))
        if "cleanup" in only:
            keep("cleanup", section_cleanup(args, work))
        if "labels" in only:
            keep("labels", section_labels(args, work))
            if "calibration" in results:
                results["calibration"]["qmnist30"] = results["labels"]["clean"]
                keep("calibration", results["calibration"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
