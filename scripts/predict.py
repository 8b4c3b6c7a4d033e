#!/usr/bin/env python3
"""Predict the classes of image files: ``python scripts/predict.py --model MODEL IMAGE_OR_FOLDER...``.

A thin entry point: the logic lives in the ``cnn_finetune`` package (``cnn_finetune.tools.predict``).
"""

import sys
from pathlib import Path

# Let the script run from a source checkout even before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnn_finetune.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
