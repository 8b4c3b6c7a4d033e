"""The command line of the training guide: ``python scripts/train_finetuned.py --epochs 30 --device cuda``.

Contract (names and defaults never change): ``--epochs`` (default from the config file),
``--device`` (auto/cuda/cpu, default auto), ``--no-resume``, ``--max-retries`` (5), ``--patience``
(8), ``--verbose``. Exit codes: 0 done, 1 training failed, 2 bad input, 130 SIGINT, 143 SIGTERM,
129 SIGHUP. The flags are derived from the fields of ``TrainConfig`` (their metadata says which have
one); this module only turns them into a config, calls ``pipeline.train`` and maps what ends the run
to an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from .config import CHOICES, DEFAULT_CONFIG_PATH, TrainConfig, build_config, default_config_file
from .errors import EXIT_SIGINT, Interrupted, TrainingFailed, UserError
from .log import logger
from .training.signals import abort_message


def _int_or_auto(text: str) -> int | str:
    """``--epochs 30`` or ``--epochs auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r} (a number, or auto)") from None


def _flag_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return _int_or_auto if set(args) == {int, str} else args[0]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (also used by the docs test to list the flags)."""
    from .runtime import tool_parser

    p = tool_parser(
        "train_finetuned.py",
        "Fine-tune the CNN v2 on your images (data/raw, data/processed) or on the built-in MNIST sample. "
        "Running the same command again continues where it stopped.",
        "Exit codes: 0 done, 1 training failed after retries, 2 bad input, 130 Ctrl+C, 143 SIGTERM, 129 SIGHUP.",
        prog=prog,
    )
    defaults = TrainConfig().to_dict()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata["flag"]
        if not flag:
            continue
        name = flag if isinstance(flag, str) else "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {defaults[f.name]})"
        kind = _flag_type(hints[f.name])
        if kind is bool:  # --verbose sets True, --no-cache sets False
            p.add_argument(name, dest=f.name, action="store_const", const=not name.startswith("--no-"), help=text)
        else:
            p.add_argument(name, dest=f.name, help=text, choices=CHOICES.get(f.name), type=None if kind is str else kind,
                           metavar="N|auto" if kind is _int_or_auto else None)
    p.add_argument("--config", type=Path, help=f"JSON file of hyper-parameters (default: {DEFAULT_CONFIG_PATH} when it exists, "
                                              "else the defaults shipped with the package)")
    p.add_argument("--cooldown", type=float, metavar="SECONDS",
                   help="pause before a retry, doubled per consecutive failure (default: random 5-10)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set aug_rotation=15 (value read as JSON, else as text)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve the config: defaults < config file < flags (only the flags actually given)."""
    # None from argparse means "not given", while None set on purpose (--base-model none,
    # --set val_data=null) must reach the config.
    overrides: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                 if f.metadata["flag"] and getattr(args, f.name) is not None}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set aug_rotation=15")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    if args.cooldown is not None:
        overrides["cooldown_min"] = overrides["cooldown_max"] = args.cooldown
    if str(overrides.get("base_model", "")).lower() == "none":
        overrides["base_model"] = None
    return build_config(args.config if args.config is not None else default_config_file(), overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train_finetuned.py`` and ``train-finetuned``; returns the exit code."""
    from .pipeline import train

    try:
        cfg = config_from_args(build_parser().parse_args(argv))
        return train(cfg).exit_code
    except (UserError, TrainingFailed) as err:
        logger.error(f"{err.label}: {err}")
        return err.exit_code
    except Interrupted as stop:
        if not stop.saved or os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for a saved stop
            logger.error(stop.message if stop.saved else "\n" + stop.message)
        return stop.exit_code
    except KeyboardInterrupt:  # before the run's signal handling was installed
        logger.error("\n" + abort_message("SIGINT", second=False))
        return EXIT_SIGINT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
