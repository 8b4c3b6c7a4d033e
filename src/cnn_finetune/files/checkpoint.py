"""Crash-safe files: atomic writes and checksummed checkpoints (how bytes reach the disk).

Every file is written to a temporary name in the same folder, flushed, fsync'ed and renamed over
the target, then the folder is fsync'ed: a reader sees the old file or the new one, never half of
one, even after a power cut. Checkpoints carry a SHA-256 of their contents and are read only with
``torch.load(weights_only=True)``, so a damaged file is detected and loading never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, NotRegularFile
from ..log import printable
from .kinds import open_regular
from .rundir import temporary_name

FORMAT = "cnn_finetune/1"

# Windows refuses to rename over a file that another program holds open: there renames are retried.
RETRY_BLOCKED_RENAMES = os.name == "nt"

# A hook the fault injector sets to kill the process half-way through writing a file.
_write_hook: Callable[[Path], None] | None = None


def set_write_hook(hook: Callable[[Path], None] | None) -> None:
    """Install a function called half-way through each atomic write, with its target (fault injection)."""
    global _write_hook
    _write_hook = hook


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(src: Path, dst: Path, attempts: int = 7) -> None:
    """``os.replace(src, dst)``, retried for about a second where an open reader blocks it.

    On Linux and macOS a rename over a file that someone is reading always works (the reader keeps
    the old file). Windows refuses it while another program has ``dst`` open (a viewer showing the
    curves, a tool loading the model), so there the rename is retried with growing pauses before
    the error goes up.
    """
    for attempt in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not RETRY_BLOCKED_RENAMES or attempt == attempts - 1:
                raise
            time.sleep(0.02 * 2 ** attempt)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            if _write_hook is None:
                fh.write(data)
            else:
                half = len(data) // 2
                fh.write(data[:half])
                fh.flush()
                os.fsync(fh.fileno())
                _write_hook(path)  # the fault injector may kill the process here, mid-write
                fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        replace_file(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/Inf written as null: JSON has no such values; names
    that are not valid UTF-8 shown escaped, see ``log.printable``)."""
    text = json.dumps(_json_safe(obj), indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {printable(str(k)): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_torch_save(obj: Any, path: Path) -> int:
    """``torch.save`` through ``atomic_write_bytes``; returns the size in bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(Path(path), data)
    return len(data)


# ------------------------------------------------------------------------------------------------
# Checksums


def content_digest(obj: Any) -> str:
    """SHA-256 over a nested structure of tensors and plain data, independent of pickling details."""
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def _digest_into(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy: a data cache may be gigabytes
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest_into(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest_into(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: Path | None = None) -> int:
    """Save a checksummed checkpoint atomically; the file it replaces becomes ``keep_previous``.

    The previous file is hard-linked to its new name before the rename, so at every instant
    ``path`` holds a complete checkpoint (old or new) and ``keep_previous`` the one before.
    """
    payload = {"format": FORMAT, "state": state}
    payload["sha256"] = content_digest(payload["state"])
    if keep_previous is not None and path.exists():
        link_or_copy(path, keep_previous)
    return atomic_torch_save(payload, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a second name of ``src``: a hard link, or a fsync'ed copy on file
    systems without hard links. Costs no second write where links work."""
    if dst.exists() and os.path.samefile(src, dst):
        # Already the same file: rename() between two names of one file does nothing and would
        # leave the temporary name behind.
        return
    tmp = temporary_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(tmp, src.read_bytes())
    replace_file(tmp, dst)
    fsync_dir(dst.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint; raises CheckpointError saying why it cannot be used."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", path=str(path))
    try:
        with open_regular(path) as fh:  # a FIFO named like a checkpoint must not hang the run
            payload = torch.load(fh, map_location="cpu", weights_only=True)
    except NotRegularFile as err:
        raise CheckpointError(f"{path} is {err.strerror}", path=str(path)) from None
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} cannot be loaded ({type(err).__name__}: {first_line}); it is truncated, corrupt or not a checkpoint",
                              path=str(path)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state" not in payload:
        raise CheckpointError(f"{path} is not a checkpoint of this program (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})",
                              path=str(path))
    if content_digest(payload["state"]) != payload.get("sha256"):
        raise CheckpointError(f"{path} fails its checksum: its contents were damaged after it was written", path=str(path))
    return payload["state"]


# ------------------------------------------------------------------------------------------------
# Model files for exchange without pickle


SAFETENSORS_SUFFIX = ".safetensors"
# 2: the SHA-256 covers the metadata (class names, normalisation, architecture) as well as the weights.
SAFETENSORS_FORMAT = "cnn_finetune/safetensors/2"
_OLD_SAFETENSORS_FORMATS = ("cnn_finetune/safetensors/1",)  # their digest covered the weights only
_OWN_KEYS = ("format", "cnn_finetune", "sha256")


def _safetensors_digest(weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the weights and every metadata entry (as the strings stored in the header)."""
    return content_digest({"weights": weights, "metadata": {k: v for k, v in metadata.items() if k not in _OWN_KEYS}})


def save_safetensors(state: dict[str, Any], path: Path) -> int:
    """Write a model file's ``state`` (``model`` weights plus metadata) as safetensors, atomically.

    The weights are the tensors; every other entry (class names, normalisation, architecture,
    config, ...) goes into the header's metadata, JSON-encoded because safetensors metadata maps
    strings to strings. A SHA-256 of the weights and the metadata makes damage detectable, as in a
    checkpoint: swapped class names or an edited mean fail it as a flipped weight does.
    Returns the size in bytes.
    """
    from safetensors.torch import save

    weights = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    metadata = {k: json.dumps(v) for k, v in state.items() if k != "model" and k not in _OWN_KEYS}
    metadata.update({"format": "pt", "cnn_finetune": SAFETENSORS_FORMAT, "sha256": _safetensors_digest(weights, metadata)})
    data = save(weights, metadata=metadata)
    atomic_write_bytes(Path(path), data)
    return len(data)


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The weights of a safetensors file and, when this program wrote it, its decoded metadata.

    A foreign file (no ``cnn_finetune`` entry in its header) gives ``None`` as metadata. Raises
    ``CheckpointError`` saying why a file cannot be used (missing, truncated, not safetensors,
    damaged weights). Reading runs no code: the format holds only raw tensors and a JSON header.
    """
    from safetensors.torch import load

    try:
        with open_regular(path) as fh:  # a FIFO would block the read forever
            data = fh.read()
        weights = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every problem
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} cannot be loaded as safetensors ({type(err).__name__}: {first_line}); "
                              "it is truncated, corrupt or not a safetensors file", path=str(path)) from None
    raw = header.get("__metadata__") or {}
    if raw.get("cnn_finetune") in _OLD_SAFETENSORS_FORMATS:
        # Its checksum cannot tell whether the class names or the normalisation were edited: refused,
        # not trusted. The .pth it came from (checksummed whole) exports a new one.
        raise CheckpointError(f"{path} was written by an earlier version of this program ({raw['cnn_finetune']}), whose checksum "
                              "does not cover the class names and normalisation; export it again from its .pth with export.py",
                              path=str(path))
    if raw.get("cnn_finetune") != SAFETENSORS_FORMAT:
        return weights, None
    if _safetensors_digest(weights, raw) != raw.get("sha256"):
        raise CheckpointError(f"{path} fails its checksum: its weights or metadata (class names, normalisation, "
                              "architecture) were changed after it was written", path=str(path))
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k not in _OWN_KEYS}
    except ValueError:
        raise CheckpointError(f"{path} has a damaged metadata header (not JSON)", path=str(path)) from None
    return weights, meta


def load_newest_valid(paths: list[Path], check: Callable[[Any, Path], None] | None = None
                      ) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
    """The first checkpoint in ``paths`` that verifies (and that ``check``, which raises
    ``CheckpointError``, accepts), with the problems met on the way."""
    problems = []
    for p in paths:
        if not p.exists():
            continue
        try:
            state = load_checkpoint(p)
            if check is not None:
                check(state, p)
            return state, p, problems
        except CheckpointError as err:
            problems.append(str(err))
    return None, None, problems
