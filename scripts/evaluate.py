#!/usr/bin/env python3
"""Evaluate a trained model on labelled data: ``python scripts/evaluate.py --model MODEL --data DATA``.

A thin entry point: the logic lives in the ``cnn_finetune`` package (``cnn_finetune.tools.evaluate``).
"""

import sys
from pathlib import Path

# Let the script run from a source checkout even before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnn_finetune.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
