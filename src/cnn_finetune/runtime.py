"""Runtime helpers shared by every tool: the device, CPU threads, software versions, tool entry points.

Training, evaluation, prediction and export all pick their device here, so ``--device`` means the
same everywhere, and none of them imports another tool's command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import __version__
from .errors import UserError
from .log import logger


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unavailable CUDA request is bad input (exit 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = torch.version.cuda or "none (a CPU-only build)"
            raise UserError(f"--device {name} was requested but CUDA is not available here (torch {torch.__version__}, "
                            f"CUDA build: {build}); use --device cpu or --device auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    return torch.device("cpu")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(num_threads: int, warn: bool = True) -> None:
    """Use ``num_threads`` CPU threads for torch (0: leave torch's default), at most one per core.

    More threads than cores only wait on each other: 4,096 made a 6 s run take 110 s. A larger
    request is capped at the cores and, with ``warn``, said so.
    """
    if num_threads <= 0:
        return
    cores = available_cores()
    if num_threads > cores:
        if warn:
            logger.warning(f"--num-threads {num_threads} is more than the {cores} CPU core(s) this process may use; "
                           f"using {cores} (more threads than cores only slow torch down)")
        num_threads = cores
    torch.set_num_threads(num_threads)


def physical_memory() -> int:
    """Bytes of memory of this machine (8 GiB assumed where the system does not tell, e.g. Windows)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def versions() -> dict[str, str]:
    """Versions of the software that produced a run."""
    import numpy
    import PIL

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {"python": sys.version.split()[0], "torch": str(torch.__version__), "numpy": str(numpy.__version__),
            "pillow": str(PIL.__version__), "cnn_finetune": __version__}


def program_name(default: str) -> str:
    """The name the user ran: the console script (``cnn-evaluate``) or the script (``evaluate.py``).

    Taken from ``sys.argv[0]`` as argparse does, but ``default`` where that names no program
    (``python -c``, ``python -m``, an embedding host) and without Windows' ``.exe``.
    """
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if name.lower().endswith(".exe"):
        name = name[:-4]
    return default if name in ("", "-c", "-m", "__main__.py") else name


def tool_parser(default_prog: str, description: str, epilog: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser every tool starts from: its program name in usage lines, and ``--version``."""
    p = argparse.ArgumentParser(prog=prog or program_name(default_prog), description=description, epilog=epilog)
    p.add_argument("--version", action="version", version=f"%(prog)s (cnn-finetune) {__version__}",
                   help="print the version of cnn-finetune and exit")
    return p


def run_tool(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None = None, interrupted: str = "nothing was written") -> int:
    """Parse the arguments and run a tool; bad input becomes a one-line message and exit code 2.

    A stop signal (the tool runs inside a ``SignalGuard``, which turns it into ``Interrupted``; a
    plain ``KeyboardInterrupt`` otherwise) becomes one line, ``interrupted`` saying what is left, and
    the signal's exit code (130 for Ctrl+C), without a traceback. A stop the tool chose to finish
    first (``saved``) says so in its own words.
    """
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        logger.error(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt as stop:
        name, saved = getattr(stop, "signal_name", "SIGINT"), getattr(stop, "saved", False)
        logger.error(getattr(stop, "message", "") if saved else f"\n{parser.prog}: stopped by {name}; {interrupted}")
        return int(getattr(stop, "exit_code", 130))
