"""Exception types that map to the command line's exit codes.

The fault model separates two kinds of failure: bad input, which no retry can fix (exit 2, nothing
touched), and trouble during training, which the trainer retries or reports (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """Bad input (config, flags, data, paths): fail at once with exit code 2, never retried."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(UserError, ValueError):
    """A configuration value or file is invalid; the message says which value and how to fix it."""


class DataError(UserError):
    """A data source is missing, empty or malformed; the message names the path."""


class TrainingFailed(Exception):
    """Training could not go on (retries used up, persistent NaN, checkpoints cannot be written)."""

    exit_code = EXIT_FAILED


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, corrupt or fails its checksum."""


def run_tool(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run a tool; bad input becomes a one-line message and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
