"""Robust fine-tuning of the compact CNN v2 for 28x28 grayscale images.

Python API (what ``scripts/train_finetuned.py`` does, for notebooks and programs)::

    from cnn_finetune import TrainConfig, train, load_model_file, load_dataset, predict_proba
    result = train(TrainConfig(epochs=5, output_dir="runs/demo"))
    model, meta = load_model_file(result.best_model_path)

These names are the stable face of the package; the sub-packages (``files``, ``data``, ``model``,
``training``, ``tools``) are its layers, mapped in ``docs/ARCHITECTURE.md``.
"""

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

# name -> module that defines it (imported on first use: ``import cnn_finetune`` stays cheap for the
# tools that only need a part).
_API = {
    "TrainConfig": "config",
    "train": "pipeline",
    "RunResult": "pipeline",
    "load_model_file": "model.loading",
    "predict_proba": "tools.inference",
    "predict_with_unknown": "tools.inference",
    "load_dataset": "data.loader",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'cnn_finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
