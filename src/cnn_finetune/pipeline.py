"""The run pipeline: from a ``TrainConfig`` to the files of a run, in named stages.

    train(config) -> RunResult
      1. prepare_data    load and split the data, compute the data report       (reads; fills the cache)
      2. plan_resume     read the output folder: resume from which checkpoint,  (reads)
                         start afresh, move an earlier run aside, or refuse
      3. build_trainer   the model (base weights or the checkpoint's) and a     (memory only)
                         one-step check on a copy of it
      4. open_run        the first write: lock, move aside, manifests, the first checkpoint
      5. fit             train (``RobustTrainer.fit``)
      6. write_reports   curves, evaluation of the best model, model card

Every check that can refuse a run (exit 2) happens in stages 1-3, so a refused run touches nothing.
The command line (``cli.py``) only turns flags into a ``TrainConfig`` and calls ``train``; a program
or notebook calls ``train`` directly. A signal ends ``train`` with ``Interrupted`` (a
``KeyboardInterrupt``), after the state at the current step was saved.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .augment import to_unit
from .checkpoint import atomic_write_json
from .checkpoint_manager import CheckpointManager, load_latest
from .config import DEFAULT_BASE_MODEL, TrainConfig, resume_mismatches
from .data_loader import Dataset, SplitData, align_classes, load_dataset, normalization_stats, stratified_split, summarize_counts
from .errors import EXIT_OK, ArtifactWriteError, TrainingFailed, UserError
from .faults import FaultInjector
from .log import logger
from .rundir import CONFIG, CONFUSION, CURVES, DATA_REPORT, EVALUATION, GUIDE_ARTIFACTS, MODEL_CARD, RunDir
from .runtime import check_single_process, configure_threads, resolve_device, versions
from .signals import SignalGuard
from .trainer import RobustTrainer


@dataclass
class PreparedData:
    """Stage 1's result: the split tensors, the data report, and the test set (if any)."""

    split: SplitData
    report: dict[str, Any]
    source: str  # the data path, or "built-in MNIST sample"
    test: Dataset | None = None

    def batch_and_steps(self, batch_size: int) -> tuple[int, int]:
        """The batch actually used (at most the training set) and the steps per epoch."""
        n = len(self.split.train_labels)
        batch = min(batch_size, n)
        return batch, math.ceil(n / batch)

    def use_normalization(self, norm: dict[str, Any]) -> None:
        """Continue with the normalisation a resumed run started with, whatever computes it today."""
        self.split.mean, self.split.std = float(norm["mean"]), float(norm["std"])
        self.report["normalization"] = {"mean": self.split.mean, "std": self.split.std}


@dataclass
class ResumePlan:
    """Stage 2's decision: the checkpoint to continue from (None: start afresh) and what to tidy."""

    state: dict[str, Any] | None = None
    source: str | None = None  # file name of the checkpoint
    damaged: list[Path] = field(default_factory=list)  # damaged newer checkpoints, moved aside in stage 4
    move_aside: bool = False  # --no-resume on a folder that holds an earlier run

    @property
    def finished(self) -> bool:
        """The checkpoint is of a run that already ended."""
        return self.state is not None and self.state.get("finished") is not None


@dataclass
class RunResult:
    """How a run ended, and where its files are."""

    status: str  # "completed", "early_stopped" or "already_finished"
    exit_code: int
    message: str
    output_dir: Path
    best: dict[str, Any] | None = None  # epoch, metric and file of the best epoch
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_model_path(self) -> Path:
        """``best_model_finetuned.pth`` of the run (load it with ``model.load_model_file``)."""
        return RunDir(self.output_dir).best


def train(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train (or continue) the run described by ``config`` (defaults when None) plus ``overrides``.

    Raises ``UserError`` (bad input; nothing was touched), ``TrainingFailed`` (recovery impossible)
    or ``Interrupted`` (a signal; the state was saved at the current step).
    """
    cfg = TrainConfig.from_dict({**(config or TrainConfig()).to_dict(), **overrides}, source="train()")
    with SignalGuard() as guard:
        check_single_process()
        faults = FaultInjector.from_env()
        device = resolve_device(cfg.device)
        configure_threads(cfg.num_threads)
        run = RunDir(cfg.output_dir)
        base = resolve_base_model(cfg)
        data = prepare_data(cfg)
        plan = plan_resume(cfg, run, data)
        if plan.finished:
            return already_finished(cfg, run, plan, data, device)
        try:
            trainer = build_trainer(cfg, data, plan, base, device, run, faults, guard)
        except torch.OutOfMemoryError as err:
            raise TrainingFailed(f"out of memory before training could start ({str(err).splitlines()[0][:200]}); "
                                 "free GPU memory or use --device cpu") from None
        run_config = manifest(cfg, data, device, trainer.init_note)
        with open_run(cfg, run, plan, data, trainer, run_config):
            fit = trainer.fit()
            logger.info(fit.message)
            write_reports(run, cfg, data, trainer.history, run_config, device)
        result = RunResult(fit.status, EXIT_OK, fit.message, run.path, fit.best, list(trainer.history))
        log_best(result, cfg)
        return result


def resolve_base_model(cfg: TrainConfig) -> Path | None:
    """The base model file to fine-tune from; a missing file is an error unless it is the default path."""
    if cfg.base_model is None:
        return None
    path = Path(cfg.base_model)
    if path.is_file():
        return path
    if cfg.base_model != DEFAULT_BASE_MODEL:
        raise UserError(f"base model {path} does not exist; pass an existing file with --base-model, or --base-model none "
                        "to train from scratch", path=str(path))
    return None


# --- stage 1 ----------------------------------------------------------------------------------------


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Load the training data (and validation and test data), split it, and describe it."""
    data_path = cfg.data if cfg.data is not None else ("data" if Path("data").is_dir() else None)

    def load(path: str | None, part: str = "train") -> Dataset:  # part: which arrays of a .npz (x_test for val/test)
        return load_dataset(path, polarity=cfg.polarity, cache_dir=cfg.cache_dir, use_cache=cfg.cache, part=part)

    ds = load(data_path)
    sources = [ds]
    report: dict[str, Any] = {"train_source": ds.report()}
    if cfg.val_data is not None:
        val_ds = align_classes(load(cfg.val_data, "test"), ds.class_names)
        sources.append(val_ds)
        train_x, train_y, val_x, val_y = ds.images, ds.labels, val_ds.images, val_ds.labels
        report["val_source"] = val_ds.report()
        fingerprint = ds.fingerprint() + ":" + val_ds.fingerprint()
    else:
        tr, va = stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
        train_x, train_y, val_x, val_y = ds.images[tr], ds.labels[tr], ds.images[va], ds.labels[va]
        fingerprint = ds.fingerprint()
    test = load(cfg.test_data, "test") if cfg.test_data is not None else None
    if test is not None:
        from .evaluate import match_classes

        match_classes(test.class_names, ds.class_names, test.source)  # unknown classes: exit 2 now, not after training
    if len(val_y) == 0:
        raise UserError(f"{ds.source} leaves no image for validation (val_fraction={cfg.val_fraction}); add images or give --val-data")
    mean, std = normalization_stats(train_x)
    split = SplitData(train_x, train_y, val_x, val_y, ds.class_names, mean, std, fingerprint)
    counts = dict(zip(ds.class_names, torch.bincount(train_y, minlength=len(ds.class_names)).tolist()))
    report.update({"split": {"train": len(train_y), "val": len(val_y), "seed": cfg.seed,
                             "val_fraction": None if cfg.val_data else cfg.val_fraction},
                   "train_class_counts": counts, "normalization": {"mean": mean, "std": std}, "fingerprint": fingerprint})
    logger.info(f"data: {ds.source}: {len(ds)} images, {len(ds.class_names)} classes; train {len(train_y)} / "
                f"validation {len(val_y)}" + (f" (cache {ds.cache})" if ds.cache != "off" else ""))
    logger.info(f"train class counts: {summarize_counts(counts)}")
    for src in sources:
        if src.skipped:
            logger.warning(f"skipped {len(src.skipped)} unusable file(s) in {src.source}, e.g. {src.skipped[0]['path']}: "
                           f"{src.skipped[0]['reason']} (all listed in {Path(cfg.output_dir) / DATA_REPORT})")
        if src.dropped_classes:
            logger.warning(f"class folder(s) without usable images dropped: {', '.join(src.dropped_classes)}")
    ds.images = torch.empty((0, 1, 28, 28), dtype=torch.uint8)  # the split holds its own copies: free the full set
    return PreparedData(split, report, data_path or "built-in MNIST sample", test)


# --- stage 2 ----------------------------------------------------------------------------------------


def plan_resume(cfg: TrainConfig, run: RunDir, data: PreparedData) -> ResumePlan:
    """Decide, reading only, whether to resume (from which checkpoint), start afresh, or refuse."""
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--output-dir {run.path} is a file, not a folder; choose a folder for the run's files", path=str(run.path))
    if not cfg.resume:
        if run.has_files() and Path.cwd().resolve().is_relative_to(run.path.resolve()):
            raise UserError(f"--no-resume cannot move {run.path} aside: it is (or contains) the current folder; choose "
                            "another --output-dir, e.g. a sub-folder", path=str(run.path))
        return ResumePlan(move_aside=run.has_files())
    if not run.path.is_dir():
        return ResumePlan()
    loaded = load_latest(run)
    for problem in loaded.problems:
        logger.warning(problem)
    if loaded.state is None and loaded.problems:
        raise UserError(f"no valid checkpoint in {run} to resume from; start afresh with --no-resume (the damaged files are "
                        "moved aside, not deleted)", path=str(run.path))
    if loaded.state is None:
        # Without a checkpoint, only the files a run writes before its first checkpoint may be replaced;
        # anything else (a model, a history, reports) belongs to someone: never overwrite it.
        foreign = run.foreign_files()
        if foreign:
            raise UserError(f"{run} holds files of an earlier run ({', '.join(foreign[:4])}) but no checkpoint to resume from; "
                            "use --no-resume to move them aside and start afresh, or choose another --output-dir", path=str(run.path))
        return ResumePlan()
    check_resumable(cfg, run, loaded.state, data)
    if loaded.problems:
        logger.info(f"using {loaded.path.name}: the newer checkpoint is damaged")
    data.use_normalization(loaded.state["normalization"])
    return ResumePlan(loaded.state, loaded.path.name, loaded.damaged)


def check_resumable(cfg: TrainConfig, run: RunDir, state: dict[str, Any], data: PreparedData) -> None:
    """Refuse (exit 2) to continue a checkpoint made on other data or with settings that change training."""
    fingerprint = data.split.fingerprint
    if state.get("data_fingerprint") != fingerprint:
        raise UserError(f"the checkpoint in {run} was trained on different data (fingerprint {str(state.get('data_fingerprint'))[:12]}..., "
                        f"now {fingerprint[:12]}...); resuming would mix two datasets. Use --no-resume to start afresh "
                        "(the old run is moved aside), or --output-dir for a separate run")
    mismatches = resume_mismatches(state.get("config", {}), cfg)
    if mismatches:
        raise UserError(f"the checkpoint in {run} was made with other settings:\n  " + "\n  ".join(mismatches)
                        + "\nrun with the same settings to continue, or use --no-resume to start afresh (the old run is moved aside)")
    _, steps = data.batch_and_steps(cfg.batch_size)
    if state["position"]["steps_per_epoch"] != steps:
        raise UserError(f"checkpoint has {state['position']['steps_per_epoch']} steps per epoch, this run {steps}; "
                        "the data or batch size differ (use --no-resume)")


# --- stage 3 ----------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig, data: PreparedData, plan: ResumePlan, base: Path | None, device: torch.device,
                  run: RunDir, faults: FaultInjector, guard: SignalGuard) -> RobustTrainer:
    """The trainer with its model: from the checkpoint, the base model, or the seed; checked on a copy."""
    from .model import load_base_model
    from .plots import CurveRefresher

    init = None
    if plan.state is None and base is not None:
        def init(model: Any) -> str:
            return load_base_model(model, base, data.split.class_names)
    elif plan.state is None and cfg.base_model:
        logger.info(f"note: no base model at {cfg.base_model}: training from scratch")
    trainer = RobustTrainer(cfg, data.split, device, checkpoints=CheckpointManager.for_config(run, cfg), init=init,
                            faults=faults, guard=guard, on_epoch_end=CurveRefresher(run / CURVES, cfg.monitor))
    if plan.state is not None:
        trainer.load_state_dict(plan.state)
    one_step_check(trainer)
    return trainer


def one_step_check(trainer: RobustTrainer) -> None:
    """One tiny forward/backward on a copy of the model: programming errors fail at once (exit 2)."""
    probe = trainer.faults.wrap(copy.deepcopy(trainer.model), trainer.pos, only=("shape",))
    probe.train()
    x, y = trainer.batches.x_train[:4], trainer.batches.y_train[:4]
    try:
        F.cross_entropy(probe(trainer.prepare(to_unit(x))).float(), y).backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        raise UserError(f"the model cannot train on this data ({type(err).__name__}: {err}); this is not fixed by retrying") from None


def manifest(cfg: TrainConfig, data: PreparedData, device: torch.device, init: str | None) -> dict[str, Any]:
    """The content of ``config_finetuned.json``: every resolved setting, the data, the versions."""
    batch, steps = data.batch_and_steps(cfg.batch_size)
    return {
        "config": cfg.to_dict(),
        "resolved": {"data": data.source, "device": str(device), "batch_size": batch, "steps_per_epoch": steps, "init": init},
        "data_fingerprint": data.split.fingerprint, "class_names": list(data.split.class_names),
        "normalization": {"mean": data.split.mean, "std": data.split.std}, "versions": versions(),
    }


# --- stage 4 ----------------------------------------------------------------------------------------


@contextmanager
def open_run(cfg: TrainConfig, run: RunDir, plan: ResumePlan, data: PreparedData, trainer: RobustTrainer,
             run_config: dict[str, Any]) -> Iterator[None]:
    """The first write to the output folder; the folder stays locked while the block runs."""
    from .model import count_parameters

    if plan.move_aside:
        moved = run.move_aside()
        logger.info(f"--no-resume: the earlier run in {run} was moved to {moved}")
    run.create()
    with run.lock():
        # On resume the weights come from the checkpoint; init_note says where the run began.
        origin = trainer.init_note if plan.state is None else f"resumes from {plan.source} (the run started {trainer.init_note})"
        logger.info(f"model: CNN v2 width {cfg.width} ({count_parameters(trainer.model):,} parameters) on "
                    f"{trainer.device}; {origin}")
        for p in run.remove_stale_temporaries():
            logger.info(f"removed {p.name}, left by a run killed while writing it")
        write_manifests(run, data.report, run_config)
        if plan.state is not None:
            pos = plan.state["position"]
            logger.info(f"resuming from {run / plan.source}: epoch {pos['epoch'] + 1}, step {pos['step']} of {pos['steps_per_epoch']}")
            trainer.checkpoints.quarantine(plan.damaged)
            trainer.checkpoints.tidy_after_resume()  # whatever a killed epoch left, the checkpoint's view wins
            trainer.note_resumed(plan.source)
        else:
            try:
                trainer.save_last()  # a rollback/retry target from the very start
            except ArtifactWriteError as err:
                raise UserError(f"cannot write {Path(err.path).name} in {run}: {err.reason}; choose a writable --output-dir",
                                path=err.path) from None
        yield


def write_manifests(run: RunDir, report: dict[str, Any], run_config: dict[str, Any]) -> None:
    """``data_report.json`` and ``config_finetuned.json``; a folder that refuses them is bad input."""
    try:
        atomic_write_json(run / DATA_REPORT, report)
        atomic_write_json(run / CONFIG, run_config)
    except OSError as err:
        raise UserError(f"cannot write to the output folder {run}: {err.strerror or err}; choose a writable --output-dir",
                        path=str(run.path)) from None


def already_finished(cfg: TrainConfig, run: RunDir, plan: ResumePlan, data: PreparedData, device: torch.device) -> RunResult:
    """A run that already ended is not trained again; its reports are redrawn only if they are missing."""
    state = plan.state or {}
    message = (f"this run already finished ({state['finished']['detail']}); nothing to do. "
               "Use --no-resume to train again (the old run is moved aside).")
    logger.info(message)
    history = state.get("history", [])
    if not (run / MODEL_CARD).exists():
        with run.lock():
            write_reports(run, cfg, data, history, manifest(cfg, data, device, state.get("init")), device)
    best = (state.get("best_keeper") or {}).get("entries") or [None]
    result = RunResult("already_finished", EXIT_OK, message, run.path, best[0], history)
    log_best(result, cfg)
    return result


# --- stage 6 ----------------------------------------------------------------------------------------


def write_reports(run: RunDir, cfg: TrainConfig, data: PreparedData, history: list[dict[str, Any]],
                  run_config: dict[str, Any], device: torch.device) -> None:
    """After training: final curves, evaluation of the best model on the validation split (and the
    test data, if given), and the model card. A failure here is reported but loses no training."""
    from .evaluate import evaluate_arrays, match_classes, write_reports as write_evaluation
    from .model import load_model_file
    from .model_card import write_model_card
    from .plots import plot_training_curves

    try:
        plot_training_curves(history, run / CURVES, cfg.monitor)
        model, meta = load_model_file(run.best, device)
        meta["path"] = str(run.best)
        split = data.split
        val = evaluate_arrays(model, meta, split.val_images, split.val_labels, device)
        val["data"] = {"source": "validation split" if cfg.val_data is None else str(cfg.val_data)}
        write_evaluation(val, run.path)
        test = None
        if data.test is not None:
            labels = match_classes(data.test.class_names, meta["class_names"], data.test.source)[data.test.labels]
            test = evaluate_arrays(model, meta, data.test.images, labels, device)
            test["data"] = {"source": data.test.source, "num_images": len(data.test)}
            write_evaluation(test, run.path, prefix="test_")
        write_model_card(run.path, config=run_config, data_report=data.report, history=history, evaluation=val,
                         test_evaluation=test)
        line = f"best model (epoch {meta['epoch']}): validation accuracy {100 * val['accuracy']:.2f}%"
        if test is not None:
            line += f", test accuracy {100 * test['accuracy']:.2f}% on {test['num_samples']} images"
        logger.info(line + f"; reports: {EVALUATION}, {CONFUSION}, {CURVES}, {MODEL_CARD}")
    except Exception as err:  # noqa: BLE001 - the trained model is safe on disk already
        logger.warning(f"the final reports could not be written ({type(err).__name__}: {err}); "
                       f"the model and checkpoints in {run} are complete")


def log_best(result: RunResult, cfg: TrainConfig) -> None:
    """The closing line: the best epoch and where the files are."""
    if result.best is not None:
        logger.info(f"best epoch {result.best['epoch']}: {cfg.monitor} {result.best['metric']:.4f}; files in {result.output_dir}/: "
                    + ", ".join(GUIDE_ARTIFACTS))
