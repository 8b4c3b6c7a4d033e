"""The command line of the training guide: ``python scripts/train_finetuned.py --epochs 30 --device cuda``.

Contract (names and defaults never change): ``--epochs`` (default from the config file),
``--device`` (auto/cuda/cpu, default auto), ``--no-resume``, ``--max-retries`` (5), ``--patience``
(8), ``--verbose``. Exit codes: 0 done, 1 training failed, 2 bad input, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import TMP_MARK, atomic_write_json, load_newest_valid
from .trainer import LAST, PREV
from .config import DEFAULT_BASE_MODEL, DEFAULT_CONFIG_PATH, TrainConfig, build_config, field_help, load_config_file, resume_mismatches
from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM, TrainingFailed, UserError
from .faults import FaultInjector
from .signals import Terminated

ARTIFACTS = ("best_model_finetuned.pth", "checkpoint_last.pth", "history.json", "config_finetuned.json")
LOCK = ".lock"  # held by the run that writes the folder


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs test to list the flags)."""
    defaults = TrainConfig().to_dict()
    helps = {k: f"{v} (default: {defaults[k]})" for k, v in field_help().items()}
    p = argparse.ArgumentParser(
        prog="train_finetuned.py",
        description="Fine-tune the CNN v2 on your images (data/raw, data/processed) or on the built-in MNIST sample. "
                    "Running the same command again continues where it stopped.",
        epilog="Exit codes: 0 done, 1 training failed after retries, 2 bad input, 130 Ctrl+C, 143 SIGTERM.",
    )
    p.add_argument("--epochs", type=int, help="training epochs (default: from the config file)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="auto picks CUDA when present (default: auto)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch; an earlier run in the output folder is moved aside, never deleted")
    p.add_argument("--max-retries", type=int, help="recovery attempts after failures (default: 5)")
    p.add_argument("--patience", type=int, help="epochs without improvement before early stopping (default: 8; 0 turns it off)")
    p.add_argument("--verbose", action="store_true", help="a per-step progress bar")
    p.add_argument("--config", type=Path, help=f"JSON file of hyper-parameters (default: {DEFAULT_CONFIG_PATH} when it exists)")
    p.add_argument("--data", help="data source: a folder with raw/ and/or processed/ class folders, a plain <class>/ tree, or an IDX images file (default: data/ when it exists, else the built-in MNIST sample)")
    p.add_argument("--val-data", help="explicit validation source instead of a split of --data")
    p.add_argument("--test-data", help="a test source evaluated with the best model at the end (e.g. ../shared/data/mnist); never used for training or model selection")
    p.add_argument("--output-dir", help="where the artifacts go (default: models/cnn_modelo_v2_finetuned)")
    p.add_argument("--base-model", help=f"weights to fine-tune from ('none': from scratch; default: {DEFAULT_BASE_MODEL} when it exists)")
    p.add_argument("--seed", type=int, help="random seed (default: 42)")
    p.add_argument("--batch-size", type=int, help="samples per step (default: 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3)")
    p.add_argument("--cooldown", type=float, metavar="SECONDS", help="pause before a retry, doubled per consecutive failure (default: random 5-10)")
    p.add_argument("--keep-best", type=int, metavar="K", help="best epochs kept as separate files (default: 3)")
    p.add_argument("--width", type=int, help=helps.get("width"))
    p.add_argument("--val-fraction", type=float, help=helps.get("val_fraction"))
    p.add_argument("--balance", choices=["none", "weighted_loss", "sampler"], help=helps.get("balance"))
    p.add_argument("--polarity", choices=["auto", "invert", "keep"], help=helps.get("polarity"))
    p.add_argument("--freeze-features-epochs", type=int, help=helps.get("freeze_features_epochs"))
    p.add_argument("--feature-lr-scale", type=float, help=helps.get("feature_lr_scale"))
    p.add_argument("--min-delta", type=float, help=helps.get("min_delta"))
    p.add_argument("--checkpoint-every-steps", type=int, metavar="N", help=helps.get("checkpoint_every_steps"))
    p.add_argument("--checkpoint-every-seconds", type=float, metavar="T", help=helps.get("checkpoint_every_seconds"))
    p.add_argument("--compile", action="store_true", default=None, help=helps.get("compile"))
    p.add_argument("--num-threads", type=int, help=helps.get("num_threads"))
    p.add_argument("--no-cache", action="store_true", help="do not read or write the preprocessed-data cache")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set aug_rotation=15 (value read as JSON, else as text)")
    return p


FLAG_TO_KEY = {
    "epochs": "epochs", "device": "device", "max_retries": "max_retries", "patience": "patience",
    "data": "data", "val_data": "val_data", "output_dir": "output_dir", "seed": "seed",
    "batch_size": "batch_size", "lr": "lr", "keep_best": "keep_best", "width": "width",
    "val_fraction": "val_fraction", "balance": "balance", "polarity": "polarity",
    "freeze_features_epochs": "freeze_features_epochs", "feature_lr_scale": "feature_lr_scale",
    "min_delta": "min_delta", "checkpoint_every_steps": "checkpoint_every_steps",
    "checkpoint_every_seconds": "checkpoint_every_seconds", "compile": "compile", "num_threads": "num_threads",
}


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """Resolve the config (defaults < file < flags); returns it and whether the base model was explicit."""
    # Only the flags actually given: None from argparse means "not given", while None set on purpose
    # (--base-model none, --set val_data=null) must reach the config.
    overrides: dict[str, Any] = {key: getattr(args, flag) for flag, key in FLAG_TO_KEY.items() if getattr(args, flag) is not None}
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
    explicit_base = False
    if args.base_model is not None:
        explicit_base = args.base_model.lower() != "none"
        overrides["base_model"] = None if args.base_model.lower() == "none" else args.base_model
    file_path = args.config
    if file_path is None and DEFAULT_CONFIG_PATH.exists():
        file_path = DEFAULT_CONFIG_PATH
    if file_path is not None and not explicit_base and "base_model" not in overrides:
        in_file = load_config_file(file_path).get("base_model", DEFAULT_BASE_MODEL)
        explicit_base = in_file not in (None, DEFAULT_BASE_MODEL)
    return build_config(file_path, overrides), explicit_base


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unavailable CUDA request is bad input (exit 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = torch.version.cuda or "none (a CPU-only build)"
            raise UserError(f"--device {name} was requested but CUDA is not available here (torch {torch.__version__}, CUDA build: {build}); use --device cpu or --device auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    return torch.device("cpu")


def move_aside(out: Path) -> Path | None:
    """Rename an existing, non-empty output folder to ``<name>.old-<timestamp>``; returns the new path."""
    if not out.exists() or not any(out.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
        n += 1
    out.rename(target)
    return target


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train_finetuned.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Outside the training loop (whose own handlers finish the step and save), a signal stops at
    # once: nothing half-written can be left, since every file is written atomically.
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        return _run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingFailed as err:
        print(f"training failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except torch.OutOfMemoryError as err:  # before training could start (moving the data, the first check)
        print(f"training failed: out of memory before training could start ({str(err).splitlines()[0][:200]}); "
              "free GPU memory or use --device cpu", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as err:
        why = "by a second interrupt" if "second" in str(err) else "by an interrupt"
        print(f"\naborted at once {why}; the last complete checkpoint is kept. Run the same command to continue.", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated as err:
        why = "by a second SIGTERM" if "second" in str(err) else "by SIGTERM"
        print(f"\nterminated at once {why}; the last complete checkpoint is kept. Run the same command to continue.", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _run(args: argparse.Namespace) -> int:
    from .data_loader import align_classes, load_dataset, normalization_stats, stratified_split, summarize_counts
    from .trainer import RobustTrainer, SplitData

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        # Several processes would each write the same files; refuse rather than corrupt a run.
        raise UserError(f"this run was started as {world} processes (WORLD_SIZE={world}); training uses one process per run: "
                        "use torchrun --nproc_per_node=1 (for automatic restarts) or plain python")
    faults = FaultInjector.from_env()
    cfg, explicit_base = config_from_args(args)
    device = resolve_device(cfg.device)

    base = Path(cfg.base_model) if cfg.base_model else None
    if base is not None and not base.is_file():
        if explicit_base:
            raise UserError(f"base model {base} does not exist; pass an existing file with --base-model, or --base-model none to train from scratch")
        base = None

    # --- data (bad input fails here, before any file is touched) ------------------------------
    data_path = cfg.data if cfg.data is not None else ("data" if Path("data").is_dir() else None)
    def load(path: str | None) -> Any:
        return load_dataset(path, polarity=cfg.polarity, cache_dir=cfg.cache_dir, use_cache=not args.no_cache)

    ds = load(data_path)
    report = {"train_source": ds.report()}
    if cfg.val_data is not None:
        val_ds = align_classes(load(cfg.val_data), ds.class_names)
        train_x, train_y, val_x, val_y = ds.images, ds.labels, val_ds.images, val_ds.labels
        report["val_source"] = val_ds.report()
        fingerprint = ds.fingerprint() + ":" + val_ds.fingerprint()
    else:
        tr, va = stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
        train_x, train_y, val_x, val_y = ds.images[tr], ds.labels[tr], ds.images[va], ds.labels[va]
        fingerprint = ds.fingerprint()
    test_ds = None
    if args.test_data is not None:
        test_ds = load(args.test_data)
        from .evaluate import match_classes

        match_classes(test_ds.class_names, ds.class_names, test_ds.source)  # unknown classes: exit 2 now, not after training
    if len(val_y) == 0:
        raise UserError(f"{ds.source} leaves no image for validation (val_fraction={cfg.val_fraction}); add images or give --val-data")
    mean, std = normalization_stats(train_x)
    data = SplitData(train_x, train_y, val_x, val_y, ds.class_names, mean, std, fingerprint)
    ds.images = torch.empty((0, 1, 28, 28), dtype=torch.uint8)  # the split holds its own copies: free the full set
    counts = dict(zip(ds.class_names, torch.bincount(train_y, minlength=len(ds.class_names)).tolist()))
    report.update({"split": {"train": len(train_y), "val": len(val_y), "seed": cfg.seed,
                             "val_fraction": None if cfg.val_data else cfg.val_fraction},
                   "train_class_counts": counts, "normalization": {"mean": mean, "std": std},
                   "fingerprint": fingerprint})
    _say(f"data: {ds.source}: {len(ds)} images, {len(ds.class_names)} classes; train {len(train_y)} / validation {len(val_y)}"
         + (f" (cache {ds.cache})" if ds.cache != "off" else ""))
    _say(f"train class counts: {summarize_counts(counts)}")
    for src in [ds] + ([val_ds] if cfg.val_data is not None else []):
        if src.skipped:
            print(f"warning: skipped {len(src.skipped)} unusable file(s) in {src.source}, e.g. {src.skipped[0]['path']}: "
                  f"{src.skipped[0]['reason']} (all listed in {Path(cfg.output_dir) / 'data_report.json'})", file=sys.stderr)
        if src.dropped_classes:
            print(f"warning: class folder(s) without usable images dropped: {', '.join(src.dropped_classes)}", file=sys.stderr)

    # --- the output folder: resume, refuse, or move aside --------------------------------------
    out = Path(cfg.output_dir)
    resume_state = None
    resumed_from = None
    if not args.no_resume and out.exists():
        state, path, problems = load_newest_valid([out / LAST, out / PREV])
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        if state is None and problems:
            raise UserError(f"no valid checkpoint in {out} to resume from; start afresh with --no-resume (the damaged files are moved aside, not deleted)")
        if state is None:
            # Without a checkpoint, only the two files a run writes before its first checkpoint may be
            # replaced; anything else (a model, a history, reports) belongs to someone: never overwrite it.
            leftovers = [p.name for p in out.iterdir() if p.name not in ("config_finetuned.json", "data_report.json")
                         and TMP_MARK not in p.name and p.name != LOCK]
            if leftovers:
                raise UserError(f"{out} holds files of an earlier run ({', '.join(sorted(leftovers)[:4])}) but no checkpoint to resume from; "
                                "use --no-resume to move them aside and start afresh, or choose another --output-dir")
        else:
            if state.get("data_fingerprint") != fingerprint:
                raise UserError(f"the checkpoint in {out} was trained on different data (fingerprint {str(state.get('data_fingerprint'))[:12]}..., "
                                f"now {fingerprint[:12]}...); resuming would mix two datasets. Use --no-resume to start afresh "
                                "(the old run is moved aside), or --output-dir for a separate run")
            mismatches = resume_mismatches(state.get("config", {}), cfg)
            if mismatches:
                raise UserError(f"the checkpoint in {out} was made with other settings:\n  " + "\n  ".join(mismatches)
                                + "\nrun with the same settings to continue, or use --no-resume to start afresh (the old run is moved aside)")
            if problems:
                _say(f"using {path.name}: the newer checkpoint is damaged")
            resume_state, resumed_from = state, path.name
    if resume_state is not None:
        # Continue with the normalisation the run started with, whatever computes it today.
        norm = resume_state["normalization"]
        data.mean, data.std = mean, std = float(norm["mean"]), float(norm["std"])
        report["normalization"] = {"mean": mean, "std": std}
    # --- base model (only used when starting afresh: a checkpoint has its own weights) ----------
    base_loader = None
    if resume_state is None and base is not None:
        from .model import load_base_model

        base_loader = lambda model: load_base_model(model, base, ds.class_names)  # noqa: E731
    elif resume_state is None and cfg.base_model:
        _say(f"note: no base model at {cfg.base_model}: training from scratch")

    from .plots import CURVES_PNG, CurveRefresher

    trainer = RobustTrainer(cfg, data, device, base_weights=base_loader, faults=faults, log=_say, verbose=args.verbose,
                            on_epoch_end=CurveRefresher(out / CURVES_PNG, cfg.monitor))
    if args.no_resume and out.exists():  # only now: every check that could refuse the run has passed
        try:
            with lock_output(out):  # never move a folder that a running training writes to
                moved = move_aside(out)
        except OSError as err:
            raise UserError(f"--no-resume cannot move the earlier run in {out} aside: {err.strerror or err}") from None
        if moved is not None:
            _say(f"--no-resume: the earlier run in {out} was moved to {moved}")
    from .model import count_parameters

    _say(f"model: CNN v2 width {cfg.width} ({count_parameters(trainer.model):,} parameters) on {device}; {trainer.init_note}")
    if resume_state is not None:
        pos = resume_state["position"]
        _say(f"resuming from {out / resumed_from}: epoch {pos['epoch'] + 1}, step {pos['step']} of {pos['steps_per_epoch']}")

    from .trainer import versions

    run_config = {
        "config": cfg.to_dict(),
        "resolved": {"data": data_path or "built-in MNIST sample", "device": str(device), "batch_size": trainer.batch_size,
                     "steps_per_epoch": trainer.steps_per_epoch,
                     "init": (resume_state or {}).get("init", trainer.init_note)},
        "data_fingerprint": fingerprint, "class_names": ds.class_names,
        "normalization": {"mean": mean, "std": std}, "versions": versions(),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_output(out)
        atomic_write_json(out / "data_report.json", report)
        atomic_write_json(out / "config_finetuned.json", run_config)
    except OSError as err:
        raise UserError(f"cannot write to the output folder {out}: {err.strerror or err}; choose a writable --output-dir") from None

    with lock:
        return _train_and_report(trainer, out, resume_state, resumed_from, run_config, report, device, test_ds)


def lock_output(out: Path) -> Any:
    """Hold an exclusive lock on ``out/.lock`` (released when the returned file is closed).

    Two runs writing the same folder would overwrite each other's checkpoints: the second one
    is refused (exit 2). Where ``fcntl`` does not exist (Windows) no lock is taken.
    """
    # Read-only: an open write handle would keep the folder's file system from being remounted
    # read-only, and the lock needs none.
    fh = os.fdopen(os.open(out / LOCK, os.O_RDONLY | os.O_CREAT, 0o644), "r")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise UserError(f"another training run is using {out} (it holds {out / LOCK}); wait for it to finish, "
                        "or choose another --output-dir") from None
    return fh


def _train_and_report(trainer: Any, out: Path, resume_state: dict[str, Any] | None, resumed_from: str | None,
                      run_config: dict[str, Any], report: dict[str, Any], device: torch.device, test_ds: Any) -> int:
    from .trainer import Interrupted

    cfg = trainer.cfg
    try:
        result = trainer.fit(resume_state, resumed_from=resumed_from)
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    _say(result.message)
    if result.status != "already_finished" or not (out / "model_card.md").exists():
        final_reports(out, trainer, run_config, report, device, test_ds)
    best = result.best
    if best is not None:
        _say(f"best epoch {best['epoch']}: {cfg.monitor} {best['metric']:.4f}; files in {out}/: " + ", ".join(ARTIFACTS))
    return result.exit_code


def final_reports(out: Path, trainer: Any, run_config: dict[str, Any], data_report: dict[str, Any],
                  device: torch.device, test_ds: Any = None) -> None:
    """After training: final curves, evaluation of the best model on the validation split (and the
    test data, if given), and the model card. A failure here is reported but loses no training."""
    from .evaluate import evaluate_arrays, match_classes, write_reports
    from .model import load_model_file
    from .model_card import write_model_card
    from .plots import CURVES_PNG, plot_training_curves

    try:
        plot_training_curves(trainer.history, out / CURVES_PNG, trainer.cfg.monitor)
        model, meta = load_model_file(out / "best_model_finetuned.pth", device)
        meta["path"] = str(out / "best_model_finetuned.pth")
        val = evaluate_arrays(model, meta, trainer.data.val_images, trainer.data.val_labels, device)
        val["data"] = {"source": "validation split" if trainer.cfg.val_data is None else str(trainer.cfg.val_data)}
        write_reports(val, out)
        test = None
        if test_ds is not None:
            labels = match_classes(test_ds.class_names, meta["class_names"], test_ds.source)[test_ds.labels]
            test = evaluate_arrays(model, meta, test_ds.images, labels, device)
            test["data"] = {"source": test_ds.source, "num_images": len(test_ds)}
            write_reports(test, out, prefix="test_")
        write_model_card(out, config=run_config, data_report=data_report, history=trainer.history,
                         evaluation=val, test_evaluation=test)
        line = f"best model (epoch {meta['epoch']}): validation accuracy {100 * val['accuracy']:.2f}%"
        if test is not None:
            line += f", test accuracy {100 * test['accuracy']:.2f}% on {test['num_samples']} images"
        _say(line + f"; reports: evaluation.json, confusion_matrix.png, {CURVES_PNG}, model_card.md")
    except Exception as err:  # noqa: BLE001 - the trained model is safe on disk already
        print(f"warning: the final reports could not be written ({type(err).__name__}: {err}); "
              f"the model and checkpoints in {out} are complete", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
