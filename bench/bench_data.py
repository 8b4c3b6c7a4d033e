"""Data benchmarks: batched augmentation vs a per-image Pillow pipeline, and the preprocessed-data cache.

    python bench/bench_data.py            # about a minute on 2 CPU cores
    python bench/bench_data.py --quick    # smaller sizes, for a smoke test

(a) Images per second of ``augment_batch`` (rotation + translation + scale + noise, batch 128, CPU,
    with 1 torch thread and with the default number) against the usual per-image pipeline: a
    ``torch.utils.data.DataLoader`` whose dataset rotates each image with ``Image.rotate``, shifts
    and scales it with ``Image.transform`` and adds NumPy noise, with ``num_workers`` 0 and 2; and,
    as the strongest per-image variant, one combined ``Image.transform`` per image (what
    torchvision's ``RandomAffine`` does). All produce the same thing: a float32 batch
    ``(128, 1, 28, 28)`` in [0, 1] from uint8 digits. The speed-up compares the best of each side.
    Target: >= 10x.
(b) Seconds to load a 10,000-image folder of PNGs the first time (decode + MNIST preprocessing)
    and again from the cache. The folder is generated from the built-in MNIST sample in a temporary
    directory: upscaled 2-4x, half of them dark-on-white, a third in colour, so that preprocessing
    does real work. Target: >= 10x.

Prints a table and writes ``bench/results/data.json``. Needs only the project's dependencies
(no torchvision).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

from cnn_finetune.data.augment import AugmentParams, augment_batch
from cnn_finetune.files.checkpoint import atomic_write_json
from cnn_finetune.data.loader import load_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"
BATCH = 128
PARAMS = AugmentParams()  # the training defaults


# ------------------------------------------------------------------------------------------------
# (a) augmentation


class PillowAugmentDataset(torch.utils.data.Dataset):
    """The per-image baseline: what a torchvision-style ``RandomAffine`` + noise pipeline does."""

    def __init__(self, images: np.ndarray, params: AugmentParams, single_warp: bool = False, seed: int = 0) -> None:
        self.images = images  # uint8, N x 28 x 28
        self.params = params
        self.single_warp = single_warp  # one Image.transform for rotation + scale + shift
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        p, rng = self.params, self.rng
        side = self.images.shape[-1]
        img = Image.fromarray(self.images[i])
        angle = float(rng.uniform(-p.rotation, p.rotation))
        inv = 1.0 / float(rng.uniform(1 - p.scale, 1 + p.scale))
        dx, dy = rng.uniform(-p.translate, p.translate, 2) * side
        c = side / 2
        if self.single_warp:  # rotation, zoom and shift about the centre (output -> input coordinates)
            cos, sin = np.cos(np.deg2rad(angle)) * inv, np.sin(np.deg2rad(angle)) * inv
            data = (cos, sin, c - cos * c - sin * c + dx, -sin, cos, c + sin * c - cos * c + dy)
        else:
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
            data = (inv, 0, c - inv * c + dx, 0, inv, c - inv * c + dy)
        img = img.transform((side, side), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = np.clip(x + rng.normal(0.0, p.noise, x.shape).astype(np.float32), 0.0, 1.0)
        return torch.from_numpy(x).unsqueeze(0)


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng(1000 + worker_id)  # workers must not share one stream


def bench_pillow(images: np.ndarray, workers: int, min_images: int, single_warp: bool = False) -> dict[str, Any]:
    """Steady-state images/s of the per-image pipeline (workers started before the clock runs)."""
    ds = PillowAugmentDataset(images, PARAMS, single_warp)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, worker_init_fn=_reseed_worker if workers else None,
                                         generator=torch.Generator().manual_seed(0))
    for i, _ in enumerate(loader):  # warm-up: start the workers, fill caches
        if i >= 3:
            break
    done, start = 0, time.perf_counter()
    while done < min_images:
        for xb in loader:
            done += xb.shape[0]
            if done >= min_images:
                break
    elapsed = time.perf_counter() - start
    del loader
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def bench_batched(images: np.ndarray, min_images: int, threads: int) -> dict[str, Any]:
    """Images/s of ``augment_batch`` on CPU, drawing batches from a uint8 tensor as the trainer does."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench_batched(images, min_images) | {"torch_threads": threads}
    finally:
        torch.set_num_threads(before)


def _bench_batched(images: np.ndarray, min_images: int) -> dict[str, Any]:
    x = torch.from_numpy(images).unsqueeze(1)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    for i in range(3):  # warm-up
        augment_batch(x[order[i * BATCH:(i + 1) * BATCH]], PARAMS, g)
    done, step, start = 0, 0, time.perf_counter()
    while done < min_images:
        lo = (step * BATCH) % (len(x) - BATCH)
        out = augment_batch(x[order[lo:lo + BATCH]], PARAMS, g)
        done += out.shape[0]
        step += 1
    elapsed = time.perf_counter() - start
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


# ------------------------------------------------------------------------------------------------
# (b) cache


def make_png_folder(root: Path, images: np.ndarray, labels: np.ndarray, count: int, seed: int = 0) -> None:
    """``count`` PNGs in root/raw/<label>/ made from MNIST digits: upscaled, some inverted, some in colour."""
    rng = np.random.default_rng(seed)
    tints = np.array([[220, 40, 40], [30, 90, 200], [20, 140, 60]], np.float32) / 255.0
    for i in range(count):
        j = i % len(images)
        digit = images[j]
        side = int(rng.integers(56, 113))  # 2-4x the MNIST size
        img = Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR)
        if i % 2:  # dark ink on white paper
            img = Image.fromarray(255 - np.asarray(img))
        if i % 3 == 0:  # coloured ink on white or black
            a = np.asarray(img, np.float32)[..., None] / 255.0
            ink = a if i % 2 == 0 else 1.0 - a
            paper = 0.0 if i % 2 == 0 else 1.0
            rgb = ink * tints[i % 3] + (1.0 - ink) * paper
            img = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
        folder = root / "raw" / str(int(labels[j]))
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img{i:05d}.png", compress_level=1)


def bench_cache(images: np.ndarray, labels: np.ndarray, count: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        t0 = time.perf_counter()
        make_png_folder(root, images, labels, count)
        generate = time.perf_counter() - t0

        t0 = time.perf_counter()
        first = load_dataset(root, cache_dir=cache)
        first_s = time.perf_counter() - t0
        assert first.cache == "miss" and len(first) + len(first.skipped) == count, (first.cache, len(first), first.skipped[:3])

        cached_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            again = load_dataset(root, cache_dir=cache)
            cached_times.append(time.perf_counter() - t0)
            assert again.cache == "hit" and torch.equal(again.images, first.images)
        cached_s = statistics.median(cached_times)
        cache_bytes = sum(f.stat().st_size for f in cache.glob("*.pt"))
        folder_bytes = sum(f.stat().st_size for f in root.rglob("*.png"))
    return {"images": count, "loaded": len(first), "skipped": len(first.skipped), "generate_s": generate,
            "first_load_s": first_s, "cached_load_s": cached_s, "cached_load_runs_s": cached_times,
            "folder_mb": folder_bytes / 2**20, "cache_mb": cache_bytes / 2**20,
            "ratio": first_s / cached_s}


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks, print the table, write the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test, ~15 s)")
    ap.add_argument("--folder-images", type=int, default=10_000, help="images in the generated folder (default 10000)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = ap.parse_args(argv)
    n_aug = 2_560 if args.quick else 20_480
    n_pil = 1_280 if args.quick else 5_120
    n_folder = 2_000 if args.quick else args.folder_images

    sample = load_dataset(None, use_cache=False)
    images = sample.images[:, 0].numpy()
    labels = sample.labels.numpy()
    threads = torch.get_num_threads()

    print(f"torch {torch.__version__}, Pillow {PIL.__version__}, {os.cpu_count()} CPU(s), torch threads {threads}", flush=True)
    batched = {t: bench_batched(images, n_aug, t) for t in sorted({1, threads})}
    pillow = {f"rotate+transform, workers={w}": bench_pillow(images, w, n_pil) for w in (0, 2)}
    pillow["one transform, workers=0"] = bench_pillow(images, 0, n_pil, single_warp=True)
    cache = bench_cache(images, labels, n_folder, repeats=3)

    best_batched = max(r["images_per_s"] for r in batched.values())
    best_pil = max(r["images_per_s"] for r in pillow.values())
    rows = [
        *[(f"augment_batch, batch 128, CPU, {t} thread(s)", f"{r['images_per_s']:,.0f} img/s", "")
          for t, r in batched.items()],
        *[(f"Pillow per image: {name}", f"{r['images_per_s']:,.0f} img/s",
           f"best batched is {best_batched / r['images_per_s']:.1f}x faster") for name, r in pillow.items()],
        ("augmentation speed-up (best vs best)", f"{best_batched / best_pil:.1f}x", "target >= 10x"),
        (f"first load, {n_folder:,} PNGs (decode + preprocess)", f"{cache['first_load_s']:.2f} s", f"{cache['loaded']:,} images"),
        ("cached load (median of 3)", f"{cache['cached_load_s']:.3f} s", f"{cache['cache_mb']:.1f} MB cache"),
        ("cache speed-up", f"{cache['ratio']:.0f}x", "target >= 10x"),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n{'benchmark':<{w0}}  {'result':>{w1}}  note")
    print(f"{'-' * w0}  {'-' * w1}  {'-' * 16}")
    for name, value, note in rows:
        print(f"{name:<{w0}}  {value:>{w1}}  {note}")

    result = {
        "benchmark": "data",
        "quick": args.quick,
        "environment": {"torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                        "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": threads,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "augment": {"params": PARAMS.__dict__, "batch": BATCH,
                    "batched": {f"threads_{t}": r for t, r in batched.items()},
                    "pillow_dataloader": pillow,
                    "speedup_best_vs_best": best_batched / best_pil,
                    "target": 10},
        "cache": {**cache, "target": 10},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
