"""Robust fine-tuning of the compact CNN v2 for 28x28 grayscale images.

Layers, left to right: ``config`` -> ``data_loader`` -> ``augment`` -> ``model`` -> ``trainer``
-> artifacts (``checkpoint``). The command line lives in ``cli``.
"""

__version__ = "0.1.0"
