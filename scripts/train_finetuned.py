#!/usr/bin/env python3
"""Fine-tune the CNN v2: ``python scripts/train_finetuned.py --epochs 30 --device cuda``.

A thin entry point: the logic lives in the ``cnn_finetune`` package (``cnn_finetune.cli``).
Run it again after any interruption and it continues where it stopped.
"""

import sys
from pathlib import Path

# Let the script run from a source checkout even before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnn_finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
