"""Robust fine-tuning of the compact CNN v2 for 28x28 grayscale images.

Python API (what ``scripts/train_finetuned.py`` does, for notebooks and programs)::

    from cnn_finetune import TrainConfig, train
    result = train(TrainConfig(epochs=5, output_dir="runs/demo"))
    result.best_model_path   # models/.../best_model_finetuned.pth

The module map is in ``docs/ARCHITECTURE.md``.
"""

from typing import Any

__version__ = "0.2.0"
__all__ = ["TrainConfig", "RunResult", "train", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use: ``import cnn_finetune`` stays cheap for the tools that only need a part.
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name in ("train", "RunResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cnn_finetune' has no attribute {name!r}")
