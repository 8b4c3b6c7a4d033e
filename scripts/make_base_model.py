#!/usr/bin/env python3
"""Make (or check) the MNIST base model shipped in the package: ``src/cnn_finetune/model/base_models/``.

    python scripts/make_base_model.py            # train it and write the package file
    python scripts/make_base_model.py --check    # train it again and compare with the shipped file

The base model is the CNN v2 trained from scratch on the built-in sample (5,000 real MNIST training
digits) with the default recipe, 15 epochs, seed 42, on the CPU with one thread and torch's AVX2
kernels (so that the arithmetic, and hence every weight, is the same on every x86-64 CPU with AVX2,
AVX-512 ones included). Training takes
about two minutes. ``--check`` exits 0 when the retrained weights are bit-identical to the shipped
ones; on a CPU with other vector instructions than the one that made the file (recorded in the file)
the float rounding may differ, and it checks that they agree within a tolerance instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _pin_vector_instructions() -> None:
    """Use torch's AVX2 kernels on every x86-64 CPU that has AVX2 (set before torch is imported).

    An AVX-512 CPU otherwise runs other kernels whose float rounding differs, the 15 epochs drift
    apart and even the best epoch changes (seen: epoch 8 instead of 13), so the shipped file could
    only be checked on the kind of CPU that made it. With the kernels pinned, AVX2 and AVX-512
    machines make the same file bit for bit. An explicit ATEN_CPU_CAPABILITY is left alone.
    """
    import os
    import platform

    if "ATEN_CPU_CAPABILITY" in os.environ or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    if " avx2" in flags:
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


_pin_vector_instructions()

import torch  # noqa: E402

from cnn_finetune import TrainConfig, train
from cnn_finetune.files.checkpoint import load_checkpoint, save_checkpoint
from cnn_finetune.config import PACKAGED_BASE_MODEL

# model_selection "best": the shipped file is the best validation epoch, as when it was made (before the choice
# of the final weights existed); every fine-tuning result measured starts from it.
RECIPE = {"epochs": 15, "seed": 42, "num_threads": 1, "base_model": None, "cache": False, "device": "cpu",
          "model_selection": "best"}
TOLERANCE = 1e-4  # only used across CPUs with other vector instructions


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use here (e.g. AVX2, AVX512)."""
    return str(torch.backends.cpu.get_cpu_capability())


def make(folder: Path) -> dict:
    """Train the base model in ``folder``; returns the content of the file to ship."""
    result = train(TrainConfig(output_dir=str(folder / "run"), **RECIPE))
    state = load_checkpoint(result.best_model_path)
    state["versions"] = {**state["versions"], "cpu_capability": cpu_capability()}
    state["config"] = {**state["config"], "output_dir": None, "cache_dir": None}  # nothing of this machine
    state["made_by"] = "python scripts/make_base_model.py (the built-in MNIST sample, from scratch, " \
                       f"{RECIPE['epochs']} epochs, seed {RECIPE['seed']}, 1 CPU thread)"
    return state


def compare(new: dict, shipped: dict) -> tuple[bool, str]:
    """Whether the retrained model is the shipped one: bit for bit on the same CPU kind, else within TOLERANCE."""
    same_cpu = shipped["versions"].get("cpu_capability") == cpu_capability()
    for key in ("class_names", "normalization", "arch_params", "epoch"):
        if new[key] != shipped[key]:
            return False, f"{key} differs: {new[key]!r} vs {shipped[key]!r}"
    worst = 0.0
    for name, tensor in shipped["model"].items():
        other = new["model"][name]
        if same_cpu and not torch.equal(tensor, other):
            return False, f"{name} differs (same CPU kind {cpu_capability()}: the weights must be bit-identical)"
        if tensor.is_floating_point():
            worst = max(worst, float((tensor.double() - other.double()).abs().max()))
    if not same_cpu and worst > TOLERANCE:
        return False, f"weights differ by up to {worst:.3g} (> {TOLERANCE}) on {cpu_capability()}"
    how = "bit for bit" if same_cpu else f"within {worst:.3g} (the file was made on {shipped['versions'].get('cpu_capability')})"
    return True, f"the retrained base model equals the shipped one {how}"


def main(argv: list[str] | None = None) -> int:
    """Make or check the shipped base model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="retrain and compare with the shipped file instead of writing it")
    p.add_argument("--out", type=Path, default=PACKAGED_BASE_MODEL, help="where to write the model file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        state = make(Path(tmp))
    if args.check:
        ok, message = compare(state, load_checkpoint(args.out))
        print(message)
        return 0 if ok else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, args.out)
    print(f"wrote {args.out} (epoch {state['epoch']}, validation accuracy {100 * state['metrics']['val_acc']:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
