"""Several processes: training images/s with 1, 2, ... processes under torchrun, the same total work.

    python bench/scaling.py                       # CPU: 1 process x 2 threads vs 2 processes x 1 thread
    python bench/scaling.py --device cuda --procs 1,2,4,8   # GPUs: one process per GPU (as many as there are)

Each configuration trains the default recipe on the built-in sample (4,500 training images, global
batch 128) from scratch for a few epochs through the real command, and reads the images per second of
the training steps from history.json (the median over the epochs after the first, which includes
start-up). Prints the speed-up against one process measured in the same run, and writes
bench/results/scaling.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_finetuned.py"


def run(procs: int, threads: int, device: str, epochs: int, work: Path) -> dict[str, Any]:
    """One training run with ``procs`` processes of ``threads`` threads; returns its images/s."""
    out = work / f"run{procs}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CNN_FINETUNE_CACHE=str(work / "cache"))
    env.pop("TRAIN_FAULTS", None)
    args = ["--epochs", str(epochs), "--base-model", "none", "--device", device, "--num-threads", str(threads),
            "--output-dir", str(out), "--set", "checkpoint_every_seconds=0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher, str(SCRIPT), *args], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{proc.stderr[-3000:]}")
    history = json.loads((out / "history.json").read_text())
    rates = [r["images_per_s"] for r in history[1:]] or [history[0]["images_per_s"]]
    return {"processes": procs, "threads_per_process": threads, "images_per_s": statistics.median(rates),
            "epochs": len(history), "wall_seconds": round(seconds, 1), "final_val_acc": history[-1]["val_acc"]}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the scaling table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--procs", default="1,2", help="comma-separated numbers of processes")
    p.add_argument("--threads", type=int, default=0, help="CPU threads in all (default: all cores; split between processes)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    args = p.parse_args(argv)
    procs = [int(n) for n in args.procs.split(",")]
    if args.device == "cuda":
        import torch

        procs = [n for n in procs if n <= torch.cuda.device_count()]  # one process per GPU
    total = args.threads or os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for n in procs:
            threads = max(1, total // n)
            results.append(run(n, threads, args.device, args.epochs, Path(tmp)))
            print(f"{n} process(es) x {threads} thread(s): {results[-1]['images_per_s']:,.0f} images/s", flush=True)
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup_vs_1"] = r["images_per_s"] / base
    report = {"device": args.device, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "epochs": args.epochs, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| processes | threads each | images/s | vs 1 process |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['processes']} | {r['threads_per_process']} | {r['images_per_s']:,.0f} | {r['speedup_vs_1']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
