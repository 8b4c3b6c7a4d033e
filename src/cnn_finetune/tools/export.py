"""Export a trained model to TorchScript, ONNX and safetensors, with its preprocessing metadata, and check them.

Command line (``scripts/export.py`` or ``cnn-export``)::

    python scripts/export.py --model models/cnn_modelo_v2_finetuned/best_model_finetuned.pth [--output-dir DIR]

writes, next to each other (default folder: ``export/`` beside the model file):

* ``<stem>.torchscript.pt``: ``torch.jit.trace`` of the model in eval mode (load with ``torch.jit.load``);
* ``<stem>.onnx``: the same network in ONNX, with a dynamic batch axis;
* ``<stem>.safetensors``: the weights without pickle, for exchanging the model: class names,
  normalisation, architecture and the training config are JSON strings in its metadata header.
  Every tool of this package (``--model``, ``--base-model``) reads it like the ``.pth`` file;
* ``<stem>.preprocessing.json``: what a consumer needs besides the network: class names, mean and
  standard deviation, input shape and layout, polarity, the calibration (temperature and "unknown"
  confidence threshold), and the result of the checks below.

Both exported networks take float32 ``N x 1 x 28 x 28`` images normalised as in training,
``(pixel / 255 - mean) / std``, and return logits; a model file with test-time views (``tta_views``, written by
training with ``tta`` on, as ``tta auto`` does for classes new to the base model) has them built in, and the output is then the log of the mean softmax
over the views, in place of logits. Each is run on a batch and compared with the
PyTorch model; a maximum absolute difference above the tolerance (default 1e-4) fails the export
(exit 1), and so does any requested export that cannot be written (a full disk, say) or checked:
nothing is left of it. The safetensors file must give exactly the same logits (``torch.equal``).
ONNX needs the ``onnx`` package (``pip install 'cnn-finetune[export]'``); without it only
TorchScript is written and the output says so (exit 0). ONNX Runtime checks the ONNX file when
installed, else ONNX's own reference evaluator does. An output folder that cannot be created is bad
input (exit 2).

A new set replaces an earlier one of the same model name whole or not at all: it is written and
checked in a hidden staging folder inside the output folder (``.<stem>.export.tmp-<pid>``) and only
then moved in, the sidecar last. Ctrl+C (or SIGTERM) before that stops within a second with exit
130 (143) and leaves the earlier set as it was; during the few renames it is held back until they
are done.

Why the TorchScript-based ONNX exporter (``dynamo=False``): in torch 2.13 it needs only ``onnx``,
takes well under a second for this network and gives a dynamic batch axis directly, whereas the
default ``torch.export`` exporter also needs ``onnxscript`` and several seconds. The network is five
convolutions, batch norm, max pooling and a linear layer, which the older exporter handles fully.
When it is unavailable (a future torch may remove it) the ``torch.export`` path is used if
``onnxscript`` is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import glob
import io
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..files.checkpoint import (
    SAFETENSORS_SUFFIX,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    replace_file,
    save_safetensors,
)
from ..files.rundir import EXPORT, TMP_MARK, temporary_name, temporary_pid
from ..errors import EXIT_FAILED, EXIT_OK, ExportUnavailable, UserError
from .calibration import model_distance, model_temperature, model_threshold
from .inference import DEFAULT_MODEL, ViewAveraged, load_inference_model, model_polarity, model_views, normalise_images
from ..log import printable
from ..model.loading import load_model_file
from ..runtime import run_tool, tool_parser
from ..training.signals import SignalGuard

TOLERANCE = 1e-4
OPSET = 17  # widely supported by runtimes (ONNX Runtime >= 1.14, TensorRT 8.6, OpenVINO)
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def check_batch(meta: dict[str, Any], n: int = 16, seed: int = 0) -> torch.Tensor:
    """A reproducible batch of normalised inputs for the agreement checks.

    Random uint8 images (a seeded generator) normalised exactly as in training: every pixel value
    and every activation path gets exercised, unlike an all-zero batch.
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return normalise_images(images, meta)


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace ``model`` (eval mode) with ``example`` and write it atomically to ``path``."""
    model.eval()
    with torch.no_grad(), quiet_deprecations():
        traced = torch.jit.trace(model, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """Load an exported TorchScript file on the CPU."""
    with quiet_deprecations():
        return torch.jit.load(str(path), map_location="cpu")


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence the deprecation notices of TorchScript (``torch.jit``) and of its ONNX exporter.

    torch 2.13 marks both as deprecated in favour of ``torch.export``; they are used on purpose (see
    the module docstring), and the notices would only alarm the person running the export.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ``model`` as ONNX with a dynamic batch axis; returns the exporter used.

    Raises ``ExportUnavailable`` with the reason when no exporter works here (missing packages).
    """
    if importlib.util.find_spec("onnx") is None:
        raise ExportUnavailable("the onnx package is not installed (pip install 'cnn-finetune[export]')")
    model.eval()
    buf = io.BytesIO()
    try:
        with quiet_deprecations():
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        exporter = "TorchScript-based (dynamo=False)"
    except Exception as legacy_err:  # noqa: BLE001 - fall back to the other exporter, else report both
        if importlib.util.find_spec("onnxscript") is None:
            raise ExportUnavailable(f"the TorchScript-based ONNX exporter failed ({type(legacy_err).__name__}: {legacy_err}) "
                               "and the torch.export-based one needs onnxscript (pip install onnxscript)") from None
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=max(OPSET, 18),
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        buf = io.BytesIO()
        program.save(buf)  # type: ignore[union-attr]
        exporter = "torch.export-based (dynamo=True)"
    data = buf.getvalue()
    import onnx

    onnx.checker.check_model(onnx.load_from_string(data))  # structural validity before writing
    atomic_write_bytes(path, data)
    return exporter


def run_onnx(path: Path, x: torch.Tensor) -> tuple[np.ndarray, str]:
    """Outputs of the ONNX file on ``x`` and the engine used (ONNX Runtime, else ONNX's reference)."""
    feed = {INPUT_NAME: x.numpy().astype(np.float32)}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return session.run(None, {name: feed[INPUT_NAME]})[0], f"onnxruntime {ort.__version__}"
    import onnx
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    name = evaluator.input_names[0]
    return np.asarray(evaluator.run(None, {name: feed[INPUT_NAME]})[0]), f"onnx {onnx.__version__} reference evaluator"


def _max_abs_diff(a: np.ndarray | torch.Tensor, b: torch.Tensor) -> float:
    a_t = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    if tuple(a_t.shape) != tuple(b.shape):
        return float("inf")
    return float((a_t - b.double()).abs().max())


def export_model(model_path: Path, out_dir: Path, *, tolerance: float = TOLERANCE, onnx: bool = True,
                 guard: SignalGuard | None = None) -> dict[str, Any]:
    """Export the model file ``model_path`` into ``out_dir`` and verify the exports.

    Returns the sidecar's content: metadata, ``files`` written, and ``checks`` with the maximum
    absolute difference of each export against PyTorch (``torchscript_max_abs_diff``,
    ``onnx_max_abs_diff``), ``passed``, and ``onnx_skipped`` (the reason) when ONNX cannot be made
    here or ``onnx_failed`` when writing or checking it failed. Raises ``UserError`` when the model
    file cannot be used or the folder cannot be created, ``OSError`` when another file cannot be written.

    The set is made and checked in a staging folder inside ``out_dir`` and only then moved in (see
    ``commit_set``): a stop or a failure before that leaves the earlier set as it was. ``guard``
    (the command line's) holds a stop signal back during the few renames of the move.
    """
    model, meta = load_inference_model(model_path, "cpu")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {out_dir}: {err.strerror or err}; choose a writable --output-dir",
                        path=str(out_dir)) from None
    stem = Path(model_path).stem
    remove_stale_staging(out_dir, stem)
    staging = temporary_name(out_dir / staging_base(stem))
    staging.mkdir()
    try:
        sidecar = _export_set(model, meta, model_path, staging, tolerance, onnx)
        with guard.deferring("finishing the export's last renames, then stopping") if guard else contextlib.nullcontext():
            commit_set(staging, out_dir, set_names(stem))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if guard is not None and guard.stop_requested:
        raise guard.stopped(f"{guard.name} received while the export was moved into {out_dir}: the new set is complete")
    return sidecar


def remove_stale_staging(out_dir: Path, stem: str) -> list[Path]:
    """Delete the staging folders of the same export left by a process that was killed (SIGKILL, power loss).

    Only ``<staging name>.tmp-<pid>`` folders whose process no longer exists and that hold nothing but
    plain files named as this set (or their temporaries) are removed: a running export's folder, or one
    where anything else was put, is left alone."""
    base = staging_base(stem)
    ours = set(set_names(stem).values())
    removed = []
    for folder in out_dir.glob(f"{glob.escape(base)}{TMP_MARK}*"):
        pid = temporary_pid(folder.name, base)
        if pid is None or folder.is_symlink() or not folder.is_dir() or _process_alive(pid):
            continue
        entries = list(folder.iterdir())
        if all(e.is_file() and not e.is_symlink() and e.name.split(TMP_MARK)[0] in ours for e in entries):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def staging_base(stem: str) -> str:
    """The hidden staging folder of ``stem``'s export set, before ``temporary_name`` adds this process's id."""
    return f".{stem}.export"


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive, remove nothing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or unknown: not ours to judge
    return True


def set_names(stem: str) -> dict[str, str]:
    """The file names of one model's export set, the sidecar last."""
    return {"torchscript": f"{stem}.torchscript.pt", "onnx": f"{stem}.onnx", "safetensors": f"{stem}{SAFETENSORS_SUFFIX}",
            "sidecar": f"{stem}.preprocessing.json"}


def commit_set(staging: Path, out_dir: Path, names: dict[str, str]) -> None:
    """Move the checked set from ``staging`` into ``out_dir``, replacing the earlier set of the same names.

    The sidecar is the set's record: the old one goes first and the new one comes last, so that at no
    moment does a sidecar vouch for files of another export (even a kill half-way leaves files with
    no sidecar, never a mix that says "passed"). A format the new set lacks (ONNX skipped or failed)
    is removed, not left from the earlier export. The folder is shared (``export/`` beside the model
    files serves every model there), so files are moved one by one rather than the folder swapped.
    """
    (out_dir / names["sidecar"]).unlink(missing_ok=True)
    for name in names.values():
        if (staging / name).exists():
            replace_file(staging / name, out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)
    fsync_dir(out_dir)


def _export_set(model: torch.nn.Module, meta: dict[str, Any], model_path: Path, folder: Path, tolerance: float,
                onnx: bool) -> dict[str, Any]:
    """Write and check every file of the set into ``folder``; returns the sidecar's content."""
    names = set_names(Path(model_path).stem)
    ts_path, onnx_path, st_path, sidecar_path = (folder / names[k] for k in ("torchscript", "onnx", "safetensors", "sidecar"))

    # Traced/exported with batch 2, checked with 16 and 1: proves the batch axis is really dynamic.
    example = check_batch(meta, 2, seed=1)
    batches = [check_batch(meta, 16, seed=0), check_batch(meta, 1, seed=2)]
    # The exported networks predict as the tools do: with the model file's test-time views built in.
    views = model_views(meta)
    network = ViewAveraged(model, meta, views).eval() if len(views) > 1 else model
    with torch.no_grad():
        expected = [network(x).float() for x in batches]
        plain = [model(x).float() for x in batches] if network is not model else expected
    checks: dict[str, Any] = {"tolerance": tolerance, "batch_sizes": [int(x.shape[0]) for x in batches]}
    files: dict[str, str | None] = {"torchscript": ts_path.name, "onnx": None, "safetensors": st_path.name}

    export_torchscript(network, example, ts_path)
    loaded = load_torchscript(ts_path)
    with torch.no_grad():
        checks["torchscript_max_abs_diff"] = max(_max_abs_diff(loaded(x), e) for x, e in zip(batches, expected))
    # The formats that need nothing but torch first; ONNX (an optional extra) last, so that when it
    # cannot be written the others are already complete. The safetensors file holds the weights (its
    # metadata the views, which the tools apply): the bare network must give exactly the same logits.
    checks["safetensors_identical"] = export_safetensors(model, meta, st_path, batches, plain)
    if _export_and_check_onnx(network, example, onnx_path, batches, expected, checks, requested=onnx):
        files["onnx"] = onnx_path.name
    measured = [checks[k] for k in ("torchscript_max_abs_diff", "onnx_max_abs_diff") if k in checks]
    checks["passed"] = (all(d <= tolerance for d in measured) and "onnx_failed" not in checks
                        and checks["safetensors_identical"])
    sidecar = export_sidecar(model_path, meta, files, checks)
    atomic_write_json(sidecar_path, sidecar)
    sidecar["files"] = {**files, "sidecar": sidecar_path.name}
    return sidecar


def export_safetensors(model: torch.nn.Module, meta: dict[str, Any], path: Path, batches: list[torch.Tensor],
                       expected: list[torch.Tensor]) -> bool:
    """Write the weights and metadata as safetensors; returns whether the file, loaded back the way
    every tool loads a model, gives exactly the logits of the PyTorch model."""
    state = {k: v for k, v in meta.items() if k != "path"}  # where it was read from is no property of the model
    save_safetensors({**state, "model": model.state_dict()}, path)
    reloaded, _ = load_model_file(path)
    with torch.no_grad():
        return all(torch.equal(reloaded(x).float(), e) for x, e in zip(batches, expected))


def _export_and_check_onnx(model: torch.nn.Module, example: torch.Tensor, onnx_path: Path, batches: list[torch.Tensor],
                           expected: list[torch.Tensor], checks: dict[str, Any], *, requested: bool) -> bool:
    """Write and verify the ONNX file, recording the outcome in ``checks``; returns whether it was written."""
    if not requested:
        checks["onnx_skipped"] = "not requested (--no-onnx)"
        onnx_path.unlink(missing_ok=True)
        return False
    try:
        checks["onnx_exporter"] = export_onnx(model, example, onnx_path)
        diffs = []
        for x, e in zip(batches, expected):
            out, engine = run_onnx(onnx_path, x)
            diffs.append(_max_abs_diff(out, e))
    except Exception as err:  # noqa: BLE001 - reported: skipped where ONNX cannot be made here, else a failure
        detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        checks["onnx_skipped" if isinstance(err, ExportUnavailable) else "onnx_failed"] = (
            detail if isinstance(err, ExportUnavailable) else f"{type(err).__name__}: {detail}")
        onnx_path.unlink(missing_ok=True)  # never leave a half-checked ONNX file, or one from an earlier export
        return False
    checks["onnx_max_abs_diff"] = max(diffs)
    checks["onnx_checked_with"] = engine
    return True


def export_sidecar(model_path: Path, meta: dict[str, Any], files: dict[str, str | None], checks: dict[str, Any]) -> dict[str, Any]:
    """The ``<stem>.preprocessing.json`` content: what a consumer needs besides the network."""
    norm = meta["normalization"]
    return {
        "format": "cnn_finetune/export/1",
        "arch": meta.get("arch", "cnn_v2"),
        "arch_params": meta.get("arch_params"),
        "class_names": meta["class_names"],
        "num_classes": len(meta["class_names"]),
        "normalization": {"mean": float(norm["mean"]), "std": float(norm["std"])},
        "input": {
            "name": INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32", "layout": "NCHW",
            "value": "(pixel / 255 - mean) / std of a uint8 28x28 grayscale image, bright strokes on a dark background",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(meta["class_names"])], "dtype": "float32",
                   "value": ("logits, in the order of class_names" if len(model_views(meta)) == 1 else
                             "the log of the mean softmax over the test-time views (tta_views), in the order of "
                             "class_names: it takes the place of logits") +
                            "; softmax(logits / calibration.temperature) gives calibrated probabilities (plain "
                            "softmax when calibration is null)"},
        "tta_views": [list(v) for v in model_views(meta)],
        "calibration": sidecar_calibration(meta),
        "polarity": model_polarity(meta),
        "preprocessing": (
            "cnn_finetune.data.imageprep.load_image_file(path, polarity, light=True): grayscale; invert when the "
            "background is bright (polarity auto) or always (invert); 28x28 images are then used as they are, "
            "others are cropped to the strokes, fitted into 20x20 keeping the aspect ratio and centred by mass "
            "in 28x28 (the MNIST layout)"
        ),
        "source_model": {"file": str(model_path), "sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
                         "epoch": meta.get("epoch"), "metrics": meta.get("metrics"),
                         "data_fingerprint": meta.get("data_fingerprint")},
        "files": files,
        "onnx_opset": OPSET if files["onnx"] else None,
        "checks": checks,
        "versions": _versions(),
    }


def sidecar_calibration(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The run's temperature and "unknown" confidence threshold, for a consumer of the TorchScript or ONNX
    file (which returns logits only); None for a model file made before calibration existed."""
    if not isinstance(meta.get("calibration"), dict):
        return None
    return {"temperature": model_temperature(meta), "unknown_threshold": model_threshold(meta),
            "rule": "unknown when max(softmax(logits / temperature)) < unknown_threshold",
            "feature_distance": ("the second check (squared Mahalanobis distance of the penultimate features) needs "
                                 "the features, which these networks do not return: it is in the .safetensors "
                                 "metadata and used by this package's tools") if model_distance(meta) else None}


def _versions() -> dict[str, str]:
    found = {"torch": str(torch.__version__)}
    for name in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(name) is not None:
            found[name] = str(getattr(__import__(name), "__version__", "?"))
    return found


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``export.py``."""
    p = tool_parser(
        "export.py",
        "Export a trained model to TorchScript, ONNX and safetensors with a JSON file of its preprocessing, "
        "and check that the exports agree with PyTorch.",
        "Exit codes: 0 exported and verified (ONNX skipped when the onnx package is missing), 1 an export "
        "could not be written or disagrees with PyTorch, 2 bad input.",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default: {DEFAULT_MODEL})")
    p.add_argument("--output-dir", type=Path, help="where the exports go (default: export/ beside the model file)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"largest accepted absolute difference of the logits (default: {TOLERANCE})")
    p.add_argument("--no-onnx", action="store_true", help="export TorchScript only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``export.py``; returns the exit code (130 on Ctrl+C, the earlier export left whole)."""
    with SignalGuard() as guard:
        return run_tool(build_parser(), lambda args: _run(args, guard), argv,
                        interrupted="the export folder keeps the earlier set as it was, nothing of this one")


def _run(args: argparse.Namespace, guard: SignalGuard) -> int:
    if not args.tolerance > 0:
        raise UserError(f"--tolerance {args.tolerance} must be positive, e.g. 1e-4")
    out_dir = args.output_dir if args.output_dir is not None else Path(args.model).parent / EXPORT
    try:
        result = export_model(args.model, out_dir, tolerance=args.tolerance, onnx=not args.no_onnx, guard=guard)
    except OSError as err:  # the folder exists, but a file of the export cannot be written (e.g. a full disk)
        _say(f"error: export failed: cannot write to {out_dir}: {err.strerror or err}; no half-written file is left. "
             "Free some space or choose another --output-dir", error=True)
        return EXIT_FAILED
    checks, files = result["checks"], result["files"]
    tol = checks["tolerance"]

    def verdict(diff: float) -> str:
        return "ok" if diff <= tol else f"FAILED (above {tol:g})"

    d = checks["torchscript_max_abs_diff"]
    _say(f"TorchScript: {out_dir / files['torchscript']}  max abs difference vs PyTorch {d:.3g}  {verdict(d)}")
    if files["onnx"]:
        d = checks["onnx_max_abs_diff"]
        _say(f"ONNX:        {out_dir / files['onnx']}  max abs difference vs PyTorch {d:.3g} "
             f"({checks['onnx_checked_with']}, {checks['onnx_exporter']} exporter)  {verdict(d)}")
    elif "onnx_failed" in checks:
        _say(f"ONNX:        FAILED, not exported: {checks['onnx_failed']}")
    else:
        # On standard output, in order with the other lines: nobody should miss that it is absent.
        _say(f"ONNX:        NOT exported, TorchScript only: {checks['onnx_skipped']}")
    same = "identical logits: ok" if checks["safetensors_identical"] else "FAILED (logits differ)"
    _say(f"safetensors: {out_dir / files['safetensors']}  weights without pickle, for --model and --base-model  {same}")
    _say(f"metadata:    {out_dir / files['sidecar']} (class names, mean/std, input shape, polarity)")
    if "onnx_failed" in checks:
        _say(f"error: the ONNX export failed ({checks['onnx_failed']}); no ONNX file was left in {out_dir}. Fix the cause "
             "and export again, or use --no-onnx for TorchScript only", error=True)
        return EXIT_FAILED
    if not checks["passed"]:
        _say("error: an exported model disagrees with the PyTorch model beyond the tolerance; do not use it", error=True)
        return EXIT_FAILED
    return EXIT_OK


def _say(line: str, error: bool = False) -> None:
    """One line of the report: standard output, or standard error for errors (names shown escaped)."""
    print(printable(line), file=sys.stderr if error else sys.stdout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
