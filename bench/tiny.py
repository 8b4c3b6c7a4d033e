"""Tiny epochs: the real command against a plain PyTorch loop, whole process each, on 600 images.

    python bench/tiny.py                  # 600 MNIST test images, 60 epochs from scratch, 3 interleaved repeats
    python bench/tiny.py --repeats 1 --epochs 10   # quicker

A user with a few hundred images trains 1-5 optimizer steps per epoch; there, what the command does
once per epoch (validation, the checkpoint and its fsync, history.json, the best-model file, the
curves) and once per process (imports, data loading and its cache, the start-up checks, the final
evaluation and plots) weighs as much as the training. Both sides run as a user runs them, each in a
fresh Python process, timed from outside:

  command  scripts/train_finetuned.py --data <600 images> --base-model none --epochs 60 --patience 0
  plain    this file's --plain-loop: read the same IDX files with numpy, the same model, augmentation
           (augment_batch), AdamW and one-cycle schedule, a validation pass per epoch, torch.save at
           the end; nothing else

The ratio printed is plain seconds / command seconds (the command's speed as a share of the plain
loop's; issue 18's target: at least 0.9). The command's own history says where its time went.
Writes bench/results/tiny.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from cnn_finetune.data.loader import read_idx, write_idx  # noqa: E402

SCRIPT = ROOT / "scripts" / "train_finetuned.py"


def build_data(folder: Path, per_class: int) -> Path:
    """``per_class`` images of each digit from the official test set, as IDX files; returns the images file."""
    from fewshot import mnist_test_file  # the benchmarks' one place to find the data (not in the timed plain process)

    images, labels = mnist_test_file()
    pick = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", images[pick])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[pick])
    return folder / "train-images-idx3-ubyte.gz"


def plain_loop(images_file: Path, epochs: int, out: Path) -> None:
    """What a user writes by hand with the same ingredients (run in its own process; the IDX files are read
    with the package's reader, which is not what is timed against)."""
    import torch
    import torch.nn.functional as F

    from cnn_finetune.config import TrainConfig
    from cnn_finetune.data.augment import AugmentParams, augment_batch, normalize, to_unit
    from cnn_finetune.model.cnn import build_model
    from cnn_finetune.training.mechanisms import lr_at

    cfg = TrainConfig()
    x = torch.from_numpy(read_idx(images_file).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(images_file.with_name("train-labels-idx1-ubyte.gz")).astype(np.int64))
    torch.manual_seed(cfg.seed)
    order = torch.randperm(len(y))
    n_val = int(round(len(y) * cfg.val_fraction))
    x_val, y_val, x_tr, y_tr = x[order[:n_val]], y[order[:n_val]], x[order[n_val:]], y[order[n_val:]]
    mean, std = float(to_unit(x_tr).mean()), float(to_unit(x_tr).std())
    model = build_model(10, cfg.width, cfg.bn_ghost_size)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.momentum, 0.999), fused=True)
    params = AugmentParams(cfg.aug_rotation, cfg.aug_translate, cfg.aug_scale, cfg.aug_noise)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps, b, step = math.ceil(len(y_tr) / cfg.batch_size), cfg.batch_size, 0
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=gen)
        model.train()
        for i in range(steps):
            idx = perm[i * b:(i + 1) * b]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, epochs * steps, cfg.lr, cfg.scheduler, cfg.warmup_fraction)
            logits = model(normalize(augment_batch(x_tr[idx], params, gen), mean, std))
            loss = F.cross_entropy(logits, y_tr[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            val_acc = float((model(normalize(to_unit(x_val), mean, std)).argmax(1) == y_val).float().mean())
    torch.save({"model": model.state_dict(), "val_acc": val_acc}, out)


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def command_breakdown(out: Path, seconds: float) -> dict[str, Any]:
    """Where the command's time went, from its own history.json."""
    history = json.loads((out / "history.json").read_text())
    epochs = sum(r.get("seconds") or 0 for r in history)
    saves = sum(r.get("save_seconds") or 0 for r in history)
    training = sum(r.get("train_seconds") or 0 for r in history)
    return {"epochs": len(history), "epoch_seconds": round(epochs, 2), "save_seconds": round(saves, 2),
            "train_seconds": round(training, 2) if training else None, "outside_epochs_seconds": round(seconds - epochs, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--per-class", type=int, default=60, help="images per digit (600 in all: 540 for training, 5 steps)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; the fastest counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tiny.json")
    p.add_argument("--plain-loop", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_loop is not None:
        plain_loop(args.plain_loop, args.epochs, args.save)
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    runs: dict[str, list[float]] = {"plain": [], "command": []}
    breakdowns = []
    with tempfile.TemporaryDirectory(prefix="tiny-") as tmp:
        work = Path(tmp)
        data = build_data(work / "data", args.per_class)
        for k in range(args.repeats):  # interleaved, so that both sides see the same machine load
            runs["plain"].append(timed([sys.executable, str(Path(__file__).resolve()), "--plain-loop", str(data),
                                        "--epochs", str(args.epochs), "--save", str(work / f"plain{k}.pth")], work))
            out = work / f"out{k}"
            seconds = timed([sys.executable, str(SCRIPT), "--data", str(data), "--base-model", "none", "--epochs",
                             str(args.epochs), "--patience", "0", "--output-dir", str(out), "--set", f"cache_dir={work / 'cache'}"], work)
            runs["command"].append(seconds)
            breakdowns.append(command_breakdown(out, seconds))
            print(f"repeat {k + 1}: plain {runs['plain'][-1]:.1f} s, command {seconds:.1f} s ({breakdowns[-1]})", flush=True)
    plain, command = min(runs["plain"]), min(runs["command"])
    report = {"environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": args.threads},
              "images": 10 * args.per_class, "epochs": args.epochs, "plain_seconds": runs["plain"], "command_seconds": runs["command"],
              "ratio": round(plain / command, 3), "target": 0.9, "command_breakdown": breakdowns}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"plain loop {plain:.1f} s, command {command:.1f} s: the command runs at {plain / command:.2f}x the plain loop's speed "
          f"(target 0.9); {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
