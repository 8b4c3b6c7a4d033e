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
import dataclasses
import logging
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .data.augment import to_unit
from .files.checkpoint import atomic_write_json, load_checkpoint
from .files.kinds import special_kind
from .training.checkpoint_manager import CheckpointManager, load_latest
from .config import CHOICES, DEFAULT_BASE_MODEL, LEGACY_DEFAULTS, TrainConfig, packaged_base_model, resume_mismatches
from .data.loader import (
    Dataset,
    SplitData,
    align_classes,
    load_dataset,
    normalization_stats,
    stratified_split,
    summarize_counts,
)
from .errors import EXIT_OK, ArtifactWriteError, TrainingFailed, UserError
from .training.distributed import Dist, from_environment
from .training.faults import FaultInjector
from .log import logger, printable
from .files.loggers import EarlyLines, TensorBoardLogger, check_tensorboard_folder, require_tensorboard, run_log
from .training.recipe import Resolved, resolve
from .training.set_aside import Decision
from .files.rundir import (
    BEST,
    CONFIG,
    CONFUSION,
    CURVES,
    DATA_REPORT,
    EVALUATION,
    GUIDE_ARTIFACTS,
    LABEL_REVIEW,
    LOG,
    MODEL_CARD,
    RELIABILITY,
    REPORT,
    TENSORBOARD,
    RunDir,
    not_a_run_message,
)
from .training.mechanisms import RetryBudget
from .runtime import configure_threads, resolve_device, versions
from .training.signals import SignalGuard
from .training.trainer import RobustTrainer

if TYPE_CHECKING:
    from .training.selection import Selection

REPORTS_NOTE = "the training has finished and is saved; writing the final reports first (a few seconds)"


@dataclass
class PreparedData:
    """Stage 1's result: the split tensors, the data report, and the test set (if any)."""

    split: SplitData
    report: dict[str, Any]
    source: str  # the data path, or "built-in MNIST sample"
    test: Dataset | None = None
    # One picture per group of report["duplicates"]["across_classes"]["examples"], for report.html.
    duplicate_pictures: list[torch.Tensor] = field(default_factory=list)

    def batch_and_steps(self, batch_size: int) -> tuple[int, int]:
        """The batch actually used (at most the training set) and the steps per epoch."""
        n = len(self.split.train_labels)
        batch = min(batch_size, n)
        return batch, math.ceil(n / batch)

    def hold_out_for_calibration(self, cfg: TrainConfig) -> None:
        """Set apart the run's calibration part of the validation split (after the plan: a resumed run
        keeps the share it started with)."""
        self.split.hold_out_for_calibration(cfg.calibration_fraction, cfg.seed)
        self.report.setdefault("split", {})["calibration"] = int(self.split.calibration.sum())

    def use_normalization(self, norm: dict[str, Any]) -> None:
        """Continue with the normalisation a resumed run started with, whatever computes it today."""
        self.split.mean, self.split.std = float(norm["mean"]), float(norm["std"])
        self.report["normalization"] = {"mean": self.split.mean, "std": self.split.std}


@dataclass
class ResumePlan:
    """Stage 2's decision: the resolved config, the checkpoint to continue from (None: start afresh),
    whether to extend it, and what to tidy."""

    config: TrainConfig  # every automatic setting resolved; epochs: the run's plan before any extension
    state: dict[str, Any] | None = None
    source: str | None = None  # file name of the checkpoint
    damaged: list[Path] = field(default_factory=list)  # damaged newer checkpoints, moved aside in stage 4
    move_aside: bool = False  # --no-resume on a folder that holds an earlier run
    extend_to: int | None = None  # a larger --epochs than the run's plan: train on to this many epochs
    notes: dict[str, str] = field(default_factory=dict)  # why each automatic setting got its value

    @property
    def finished(self) -> bool:
        """The checkpoint is of a run that already ended and is not extended."""
        return self.state is not None and self.state.get("finished") is not None and self.extend_to is None


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

    Under ``torchrun`` every process calls it: rank 0 reads and writes the files, all train.
    Raises ``UserError`` (bad input; nothing was touched), ``TrainingFailed`` (recovery impossible)
    or ``Interrupted`` (a signal; the state was saved at the current step).
    """
    cfg = TrainConfig.from_dict({**(config or TrainConfig()).to_dict(), **overrides}, source="train()")
    # Under torchrun a Ctrl+C reaches each worker from the terminal and again from the agent.
    with SignalGuard(debounce=2.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0) as guard:
        device = resolve_device(cfg.device)
        dist = from_environment(device.type)
        try:
            return run_training(cfg, dist, worker_device(device, dist), guard)
        finally:
            if dist.enabled:
                # This worker's outcome is decided. As soon as one worker exits with an error, torchrun's
                # agent sends SIGTERM to the others, which would turn their own exit code (2 for bad input,
                # 130 after a saved stop) into 143 or -15 while they leave the group and exit.
                guard.ignore_from_now(signal.SIGTERM)
            dist.close()


def run_training(cfg: TrainConfig, dist: Dist, device: torch.device, guard: SignalGuard) -> RunResult:
    """The stages, on every process: the main one decides and writes, the others follow."""
    if not dist.is_main:
        logger.setLevel(logging.ERROR)  # one process speaks for the run
    with early_lines(dist.is_main) as early:  # for train.log, once the folder may be written
        cool_down_after_restart(cfg)
        configure_threads(cfg.num_threads)
        run = RunDir(cfg.output_dir)
        check_apart_from_data(cfg, run)
        data = local_main_first(dist, lambda: prepare_data(cfg))  # one process per machine fills the data cache
        base, base_note, plan = main_decides(dist, lambda: plan_run(cfg, run, data))
        if plan.state is not None:
            data.use_normalization(plan.state["normalization"])  # the run's own, whatever computes it today
            if plan.state.get("world_size", 1) != dist.world:
                logger.info(f"resuming a checkpoint of {plan.state.get('world_size', 1)} process(es) with {dist.world}: "
                            "training continues at the same sample position, but the result is not bit-identical to a "
                            f"run that kept {plan.state.get('world_size', 1)} (the gradients are summed in another order)")
        data.hold_out_for_calibration(plan.config)
        if plan.finished:
            return already_finished(plan.config, run, plan, data, device, dist, guard)
        return fit_planned(plan, data, base, base_note, device, run, guard, dist, early)


def fit_planned(plan: ResumePlan, data: PreparedData, base: Path | None, base_note: str | None, device: torch.device,
                run: RunDir, guard: SignalGuard, dist: Dist, early: EarlyLines | None) -> RunResult:
    """Build the trainer, open the run folder (main process), train, write the reports."""
    try:
        trainer = build_trainer(plan.config, data, plan, base, base_note, device, run, FaultInjector.from_env(dist.rank),
                                guard, dist)
    except torch.OutOfMemoryError as err:
        raise TrainingFailed(f"out of memory before training could start ({str(err).splitlines()[0][:200]}); "
                             "free GPU memory or use --device cpu") from None
    cfg = trainer.cfg  # with the extension's epochs, if any
    run_config = manifest(cfg, data, device, trainer.init_note, plan.notes, dist.world)
    with open_run(cfg, run, plan, data, trainer, run_config, early) if dist.is_main else nullcontext():
        dist.barrier()  # the folder is ready
        first_save(trainer, plan, run)
        fit = trainer.fit()
        with finishing(guard):
            logger.info(fit.message)
            review = trainer.steps.review.state_dict(dist.sum_)  # every rank: the sum over the ranks is a collective
            aside = trainer.set_aside.images if trainer.set_aside is not None else None
            if dist.is_main:
                write_reports(run, cfg, data, trainer.history, run_config, device, review, aside)
        result = RunResult(fit.status, EXIT_OK, fit.message, run.path, fit.best, list(trainer.history))
        log_best(result, cfg)
    return result


@contextmanager
def early_lines(enabled: bool) -> Iterator[EarlyLines | None]:
    """Keep what is logged until ``train.log`` can be opened (only the main process writes it)."""
    if not enabled:
        yield None
        return
    early = EarlyLines()
    logger.addHandler(early)
    try:
        yield early
    finally:
        logger.removeHandler(early)


def plan_run(cfg: TrainConfig, run: RunDir, data: PreparedData) -> tuple[Path | None, str | None, ResumePlan]:
    """The base model and the resume plan (the main process reads the files and decides)."""
    if cfg.logger == "tensorboard":
        require_tensorboard()  # before anything is touched: a missing package is bad input
        check_tensorboard_folder(run / TENSORBOARD)  # so is a file where its folder goes
    base, base_note = resolve_base_model(cfg, data)
    return base, base_note, plan_resume(cfg, run, data, fine_tuning=base is not None, base=base)


def worker_device(device: torch.device, dist: Dist) -> torch.device:
    """This process's device: under torchrun on CUDA, the GPU of its local rank."""
    return torch.device("cuda", dist.local_rank) if dist.enabled and device.type == "cuda" else device


def cool_down_after_restart(cfg: TrainConfig) -> None:
    """Under torchrun, a restarted worker waits like a retry would (``--cooldown``), then resumes."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts > 0:
        budget = RetryBudget(cfg.max_retries, cfg.cooldown_min, cfg.cooldown_max)
        budget.consecutive = restarts
        seconds = budget.cooldown_seconds()
        logger.info(f"restart {restarts} by torchrun after a failure: cooling down {seconds:.1f}s, then resuming")
        time.sleep(seconds)


def local_main_first(dist: Dist, load: Callable[[], Any]) -> Any:
    """``load()`` on local rank 0 first (it fills the cache), then on the other processes of the machine;
    an error on any of them (bad ``--data``) is raised on every process (``Dist.agree``)."""
    first = dist.agree(load, run_here=dist.local_rank == 0)
    later = dist.agree(load, run_here=dist.local_rank != 0)
    return first if dist.local_rank == 0 else later


def main_decides(dist: Dist, decide: Callable[[], Any]) -> Any:
    """``decide()`` on the main process; its result, or the error it raised, on every process."""
    if not dist.enabled:
        return decide()
    outcome: tuple[str, Any] = ("ok", None)
    if dist.is_main:
        try:
            outcome = ("ok", decide())
        except (UserError, TrainingFailed) as err:
            outcome = ("error", err)
    kind, value = dist.broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def resolve_base_model(cfg: TrainConfig, data: PreparedData) -> tuple[Path | None, str | None]:
    """The base model file to fine-tune from (None: from scratch) and a note on the choice.

    A missing explicit file is an error. In place of the default path, when the user has no file
    there, the MNIST base model shipped in the package is used, unless it cannot serve: another
    width, or the very data it was trained on (the built-in sample).
    """
    if cfg.base_model is None:
        return None, None
    path = Path(cfg.base_model)
    what = special_kind(path)
    if what is not None:  # a FIFO would block the read forever
        raise UserError(f"--base-model {path} is {what}, not a model file; pass a .pth or .safetensors file, or --base-model none",
                        path=str(path))
    if path.is_file():
        return path, None
    if cfg.base_model != DEFAULT_BASE_MODEL:
        raise UserError(f"base model {path} does not exist; pass an existing file with --base-model, or --base-model none "
                        "to train from scratch", path=str(path))
    shipped = packaged_base_model()
    missing = f"no base model at {cfg.base_model}"
    if shipped is None:
        return None, f"{missing}: training from scratch"
    meta = load_checkpoint(shipped)
    if meta["arch_params"]["width"] != cfg.width or meta["arch_params"]["bn_ghost_size"] != cfg.bn_ghost_size:
        return None, (f"{missing}: training from scratch (the MNIST base model shipped with the package has width "
                      f"{meta['arch_params']['width']}, this run {cfg.width})")
    if meta.get("data_fingerprint") == data.split.fingerprint:
        return None, f"{missing}: training from scratch (the MNIST base model shipped with the package was trained on this very data)"
    return shipped, f"{missing}: fine-tuning from the MNIST base model shipped with the package"


# --- stage 1 ----------------------------------------------------------------------------------------


def check_apart_from_data(cfg: TrainConfig, run: RunDir) -> None:
    """Refuse (exit 2) an output folder inside a data source, or a data source inside the output folder.

    A run folder inside the data becomes a class of the next run (its curves and confusion matrix are
    images of a class "run"); data inside the run folder would be moved aside with it by --no-resume.
    """
    default = "data" if cfg.data is None and Path("data").is_dir() else None
    for flag, source in (("--data", cfg.data or default), ("--val-data", cfg.val_data), ("--test-data", cfg.test_data)):
        where = run.overlap(source) if source is not None else None
        if where == "inside":
            raise UserError(f"--output-dir {run} is inside the data folder {source} ({flag}): the run's files would become "
                            "part of the data of the next run; choose an --output-dir outside the data", path=str(run.path))
        if where == "contains":
            raise UserError(f"the data {source} ({flag}) is inside --output-dir {run}: the output folder holds only the "
                            "run's files; choose an --output-dir that does not contain the data", path=str(run.path))


def check_duplicates(ds: Dataset, val_ds: Dataset | None, test: Dataset | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Copies of one image under two labels in the training (and validation) data, and test images that
    are copies of them: reported (data_report.json, warnings, report.html), never removed
    (``data.duplicates``). Returns the report and the listed groups' pictures."""
    from .data.duplicates import describe, describe_overlap, find_duplicates, find_overlap

    parts = [ds] + ([val_ds] if val_ds is not None else [])
    images = torch.cat([p.images for p in parts]) if len(parts) > 1 else ds.images
    labels = torch.cat([p.labels for p in parts]) if len(parts) > 1 else ds.labels
    origin = [o for p in parts for o in p.origin]
    source = " and ".join(p.source for p in parts)
    pictures: list[torch.Tensor] = []
    found = find_duplicates(images, labels, ds.class_names, origin, pictures)
    lines = describe(found, source)
    if test is not None:
        found["test_copies"] = find_overlap(images, labels, ds.class_names, origin, test.images, test.labels,
                                            test.class_names, test.origin)
        inside = find_duplicates(test.images, test.labels, test.class_names, test.origin)
        found["test_across_classes"] = inside["across_classes"]
        lines += describe_overlap(found["test_copies"], test.source) + describe(inside, f"test data {test.source}", test=True)
    for line in lines:
        logger.warning(line)
    return found, pictures


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Load the training data (and validation and test data), split it, and describe it."""
    data_path = cfg.data if cfg.data is not None else ("data" if Path("data").is_dir() else None)

    def load(path: str | None, part: str = "train") -> Dataset:  # part: which arrays of a .npz (x_test for val/test)
        return load_dataset(path, polarity=cfg.polarity, cache_dir=cfg.cache_dir, use_cache=cfg.cache,
                            max_pixels=cfg.max_image_pixels, part=part)

    ds = load(data_path)
    sources = [ds]
    report: dict[str, Any] = {"train_source": ds.report()}
    if cfg.val_data is not None:
        val_ds = align_classes(load(cfg.val_data, "test"), ds.class_names)
        sources.append(val_ds)
        train_x, train_y, val_x, val_y = ds.images, ds.labels, val_ds.images, val_ds.labels
        train_origin = list(ds.origin)
        report["val_source"] = val_ds.report()
        fingerprint = ds.fingerprint() + ":" + val_ds.fingerprint()
    else:
        tr, va = stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
        train_x, train_y, val_x, val_y = ds.images[tr], ds.labels[tr], ds.images[va], ds.labels[va]
        train_origin = [ds.origin[i] for i in tr.tolist()]
        fingerprint = ds.fingerprint()
    test = load(cfg.test_data, "test") if cfg.test_data is not None else None
    if test is not None:
        from .tools.evaluate import match_classes

        match_classes(test.class_names, ds.class_names, test.source)  # unknown classes: exit 2 now, not after training
    report["duplicates"], duplicate_pictures = check_duplicates(ds, sources[1] if cfg.val_data is not None else None, test)
    if len(val_y) == 0:
        raise UserError(f"{ds.source} leaves no image for validation (val_fraction={cfg.val_fraction}); add images or give --val-data")
    mean, std = normalization_stats(train_x)
    split = SplitData(train_x, train_y, val_x, val_y, ds.class_names, mean, std, fingerprint, train_origin)
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
    return PreparedData(split, report, data_path or "built-in MNIST sample", test, duplicate_pictures)


# --- stage 2 ----------------------------------------------------------------------------------------


def plan_resume(cfg: TrainConfig, run: RunDir, data: PreparedData, fine_tuning: bool, base: Path | None = None) -> ResumePlan:
    """Decide, reading only, whether to resume (from which checkpoint), start afresh, or refuse.

    A fresh run from ``base`` whose ``feature_lr_scale``, ``epochs``, ``tta``, ``bn_stats`` or ``set_aside`` is automatic
    measures how well the base model's features separate the training classes; a continued run keeps what
    its start decided."""
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--output-dir {run.path} is a file, not a folder; choose a folder for the run's files", path=str(run.path))
    _, steps = data.batch_and_steps(cfg.batch_size)

    def start_afresh() -> Resolved:
        probe = base is not None and fine_tuning and (cfg.feature_lr_scale is None or cfg.epochs == "auto"
                                                     or "auto" in (cfg.tta, cfg.bn_stats, cfg.set_aside))
        labels = data.split.train_labels
        per_class = len(labels) / max(1, len(data.split.class_names))
        return resolve(cfg, steps, fine_tuning, separability=base_separability(cfg, base, data) if probe else None,
                       per_class=per_class)
    if not cfg.resume:
        fresh = start_afresh()
        if run.has_files() and Path.cwd().resolve().is_relative_to(run.path.resolve()):
            raise UserError(f"--no-resume cannot move {run.path} aside: it is (or contains) the current folder; choose "
                            "another --output-dir, e.g. a sub-folder", path=str(run.path))
        if run.not_ours():  # a data folder, a home folder...: only an earlier run is ever moved
            raise UserError(not_a_run_message(run, run.not_ours()), path=str(run.path))
        return ResumePlan(fresh.config, move_aside=run.has_files(), notes=fresh.notes)
    loaded = load_latest(run) if run.path.is_dir() else None
    for problem in loaded.problems if loaded else []:
        logger.warning(problem)
    if loaded is not None and loaded.state is None and loaded.problems:
        raise UserError(f"no valid checkpoint in {run} to resume from; start afresh with --no-resume (the damaged files are "
                        "moved aside, not deleted)", path=str(run.path))
    if loaded is None or loaded.state is None:
        # Without a checkpoint, only the files a run writes before its first checkpoint may be replaced;
        # anything else (a model, a history, reports) belongs to someone: never overwrite it.
        strangers = run.not_ours()
        if strangers:
            shown = ", ".join(printable(n) for n in strangers[:4]) + (f" and {len(strangers) - 4} more" if len(strangers) > 4 else "")
            raise UserError(f"{run} holds files that are not this program's ({shown}) and no checkpoint: it is not the "
                            "folder of an earlier run, and a run writes only into a folder of its own; choose an empty "
                            "or new --output-dir", path=str(run.path))
        foreign = run.foreign_files()
        if foreign:
            raise UserError(f"{run} holds files of an earlier run ({', '.join(foreign[:4])}) but no checkpoint to resume from; "
                            "use --no-resume to move them aside and start afresh, or choose another --output-dir", path=str(run.path))
        fresh = start_afresh()
        return ResumePlan(fresh.config, notes=fresh.notes)
    plan = plan_continuation(cfg, run, loaded.state, data, steps)
    if loaded.problems:
        logger.info(f"using {loaded.path.name}: the newer checkpoint is damaged")
    plan.source, plan.damaged = loaded.path.name, loaded.damaged
    return plan


def plan_continuation(cfg: TrainConfig, run: RunDir, state: dict[str, Any], data: PreparedData, steps: int) -> ResumePlan:
    """Continue a checkpoint: the same resolved settings as when it started, and its plan, perhaps extended."""
    started_from_base = str(state.get("init", "")).startswith("fine-tuning")
    fine_tuning = bool(state.get("fine_tuning", started_from_base))
    # The factor and the freezing chosen automatically when the run started stay, even if the default
    # has changed since (a newer version): the run goes on as the run it was, instead of being refused.
    automatic = state.get("automatic", {})
    kept = {key: state["config"].get(key) for key in ("feature_lr_scale", "freeze_features_epochs")
            if fine_tuning and getattr(cfg, key) is None and key in automatic}
    for key in ("tta", "bn_stats", "set_aside"):  # the views, the statistics and the set-aside it started with
        if getattr(cfg, key) == "auto" and state["config"].get(key) in set(CHOICES[key]) - {"auto"}:
            kept[key] = state["config"][key]
    resolved = resolve(dataclasses.replace(cfg, **kept), steps, fine_tuning)
    for key in kept:
        resolved.notes[key] = f"{automatic.get(key, kept[key])}; decided when the run started, kept"
    for key, legacy in LEGACY_DEFAULTS.items():
        if key not in state["config"]:  # a run that started before the setting existed goes on as it began
            resolved.config = dataclasses.replace(resolved.config, **{key: legacy})
            resolved.notes[key] = f"{legacy}; the run started before this setting existed, kept"
    planned = int(state["config"]["epochs"])
    finished = state.get("finished")
    done = int(finished["epoch"]) if finished else int(state["position"]["epoch"])
    extend_to = epochs_to_train(cfg, resolved.config.epochs, planned, done, run)
    config = dataclasses.replace(resolved.config, epochs=planned)
    check_resumable(config, run, state, data)
    if extend_to is not None:
        resolved.notes["epochs"] = f"extended from {planned} to {extend_to} epochs ({done} done)"
    elif "epochs" in resolved.notes and resolved.config.epochs != planned:
        # "auto" resolved today to fewer epochs than the plan (a lower ceiling, or one chosen from a measurement
        # the start made): the run keeps its plan, so the note says how the start chose it
        resolved.notes["epochs"] = f"{automatic.get('epochs', f'auto: {planned} epochs')}; decided when the run started, kept"
    return ResumePlan(config, state, extend_to=extend_to, notes=resolved.notes)


def epochs_to_train(cfg: TrainConfig, requested: int, planned: int, done: int, run: RunDir) -> int | None:
    """None: continue the run's plan; else the larger number of epochs to extend it to. A number of
    epochs smaller than the plan is refused ("auto" keeps the plan unless it resolves to more)."""
    if cfg.epochs == "auto":
        requested = max(requested, planned)
    if requested < done:
        raise UserError(f"--epochs {requested} is fewer than the {done} epochs the run in {run} has already done; use a "
                        "larger --epochs to train it further, or --no-resume to start afresh")
    if requested < planned:
        raise UserError(f"--epochs {requested} is fewer than the {planned} epochs the run in {run} was planned with; use "
                        f"--epochs {planned} to continue it, a larger value to extend it, or --no-resume to start afresh")
    return requested if requested > planned else None


def base_separability(cfg: TrainConfig, base: Path, data: PreparedData) -> float:
    """How well the base model's feature layers separate the training classes (``feature_separability``),
    on a model built and loaded only for this (a base that does not fit fails here as it would later)."""
    from .model.cnn import build_model
    from .model.loading import load_base_model
    from .training.recipe import feature_separability

    split = data.split
    model = build_model(len(split.class_names), width=cfg.width, bn_ghost_size=cfg.bn_ghost_size)
    load_base_model(model, base, split.class_names)
    separability = feature_separability(model.features, split.train_images, split.train_labels, split.mean, split.std)
    logger.debug(f"base model separability on the training split: {separability:.4f}")
    return separability


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


def build_trainer(cfg: TrainConfig, data: PreparedData, plan: ResumePlan, base: Path | None, base_note: str | None,
                  device: torch.device, run: RunDir, faults: FaultInjector, guard: SignalGuard,
                  dist: Dist | None = None) -> RobustTrainer:
    """The trainer with its model: from the checkpoint, the base model, or the seed; checked on a copy.

    Under several processes the main one loads the base model; DDP gives its weights to the others."""
    dist = dist or Dist()
    from .model.loading import load_base_model
    from .tools.plots import CurveRefresher

    init = None
    if plan.state is None and base is not None and dist.is_main:
        def init(model: Any) -> str:
            return load_base_model(model, base, data.split.class_names)
    if plan.state is None and base_note:
        logger.info(f"note: {base_note}")
    trainer = RobustTrainer(cfg, data.split, device, checkpoints=CheckpointManager.for_config(run, cfg, writer=dist.is_main),
                            init=init, faults=faults, guard=guard, dist=dist,
                            on_epoch_end=CurveRefresher(run / CURVES, cfg.monitor) if dist.is_main else None)
    trainer.automatic = dict(plan.notes)  # saved with the state: a resumed run can say why, too
    if plan.state is not None:
        load_checked(trainer, plan, run)
    if plan.extend_to is not None:
        trainer.extend_to(plan.extend_to)
    one_step_check(trainer)
    return trainer


def load_checked(trainer: RobustTrainer, plan: ResumePlan, run: RunDir) -> None:
    """Load the planned checkpoint; weights or an optimizer state that do not fit the model its own settings
    describe (a forged or damaged file whose checksum was computed again) are bad input, before any write."""
    try:
        trainer.load_state_dict(plan.state or {})
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        raise UserError(f"{run / str(plan.source)} does not fit the model of its own settings ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]}); it was damaged or forged. Move it aside, or use --no-resume to "
                        "start afresh", path=str(run / str(plan.source))) from None


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


def manifest(cfg: TrainConfig, data: PreparedData, device: torch.device, init: str | None,
             notes: dict[str, str] | None = None, processes: int = 1) -> dict[str, Any]:
    """The content of ``config_finetuned.json``: every resolved setting (and why), the data, the versions."""
    batch, steps = data.batch_and_steps(cfg.batch_size)
    return {
        "config": cfg.to_dict(),
        "resolved": {"data": data.source, "device": str(device), "batch_size": batch, "steps_per_epoch": steps, "init": init,
                     "epochs": cfg.epochs, "patience": cfg.patience, "automatic": dict(notes or {}), "processes": processes},
        "data_fingerprint": data.split.fingerprint, "class_names": list(data.split.class_names),
        "normalization": {"mean": data.split.mean, "std": data.split.std}, "versions": versions(),
    }


# --- stage 4 ----------------------------------------------------------------------------------------


@contextmanager
def open_run(cfg: TrainConfig, run: RunDir, plan: ResumePlan, data: PreparedData, trainer: RobustTrainer,
             run_config: dict[str, Any], early: EarlyLines | None = None) -> Iterator[None]:
    """The first write to the output folder; the folder stays locked, and train.log open, while the block runs."""
    if plan.move_aside:
        moved = run.move_aside()
        logger.info(f"--no-resume: the earlier run in {run} was moved to {moved}")
    run.create()
    what = "a new run" if plan.state is None else f"resuming from {plan.source}"
    with run.lock(), run_log(run / LOG, what, early):
        describe_start(cfg, run, plan, trainer)
        write_manifests(run, data.report, run_config)
        if plan.state is not None:
            trainer.checkpoints.quarantine(plan.damaged)
            trainer.checkpoints.tidy_after_resume()  # whatever a killed epoch left, the checkpoint's view wins
        if cfg.logger == "tensorboard":
            # The first step this run logs is the one after the checkpoint's: a killed run's later events go.
            trainer.metrics_logger = TensorBoardLogger(run / TENSORBOARD, first_step=trainer.pos.global_step + 1)
        try:
            yield
        finally:
            if trainer.metrics_logger is not None:
                trainer.metrics_logger.close()


def describe_start(cfg: TrainConfig, run: RunDir, plan: ResumePlan, trainer: RobustTrainer) -> None:
    """The start-up lines: the model, the automatic settings, leftovers removed, where it resumes."""
    from .model.cnn import count_parameters

    # On resume the weights come from the checkpoint; init_note says where the run began.
    origin = trainer.init_note if plan.state is None else f"resumes from {plan.source} (the run started {trainer.init_note})"
    logger.info(f"model: CNN v2 width {cfg.width} ({count_parameters(trainer.model):,} parameters) on "
                f"{trainer.device}; {origin}")
    for key, note in plan.notes.items():
        logger.info(f"{key}: {note}")
    for p in run.remove_stale_temporaries():
        logger.info(f"removed {p.name}, left by a run killed while writing it")
    if plan.state is not None:
        pos = plan.state["position"]
        logger.info(f"resuming from {run / plan.source}: epoch {pos['epoch'] + 1}, step {pos['step']} of {pos['steps_per_epoch']}")
        if plan.extend_to is not None:
            logger.info(f"extending the run to {plan.extend_to} epochs: a learning-rate segment of its own over the "
                        "added epochs (warm-up, then decay)")


def first_save(trainer: RobustTrainer, plan: ResumePlan, run: RunDir) -> None:
    """Every process: a fresh run's first checkpoint (the retry and rollback target from the very start), or
    an extended plan saved at once (a retry or rollback reloads it); a resumed run notes where it resumed."""
    if plan.state is not None:
        trainer.note_resumed(plan.source)
        if plan.extend_to is not None:
            trainer.save_last(progress=False)
        return
    try:
        trainer.save_last()
    except ArtifactWriteError as err:
        raise UserError(f"cannot write {Path(err.path).name} in {run}: {err.reason}; choose a writable --output-dir",
                        path=err.path) from None


def write_manifests(run: RunDir, report: dict[str, Any], run_config: dict[str, Any]) -> None:
    """``data_report.json`` and ``config_finetuned.json``; a folder that refuses them is bad input."""
    try:
        atomic_write_json(run / DATA_REPORT, report)
        atomic_write_json(run / CONFIG, run_config)
    except OSError as err:
        raise UserError(f"cannot write to the output folder {run}: {err.strerror or err}; choose a writable --output-dir",
                        path=str(run.path)) from None


def already_finished(cfg: TrainConfig, run: RunDir, plan: ResumePlan, data: PreparedData, device: torch.device,
                     dist: Dist | None = None, guard: SignalGuard | None = None) -> RunResult:
    """A run that already ended is not trained again; its reports are redrawn only if they are missing."""
    state = plan.state or {}
    message = (f"this run already finished ({state['finished']['detail']}); nothing to do. "
               "Use --no-resume to train again (the old run is moved aside).")
    logger.info(message)
    history = state.get("history", [])
    if not (run / MODEL_CARD).exists() and (dist or Dist()).is_main:
        with run.lock(), finishing(guard):
            decision = Decision.from_state(state.get("set_aside"))
            write_reports(run, cfg, data, history, manifest(cfg, data, device, state.get("init")), device,
                          state.get("label_review"), decision.images if decision is not None else None)
    best = (state.get("best_keeper") or {}).get("entries") or [None]
    result = RunResult("already_finished", EXIT_OK, message, run.path, best[0], history)
    log_best(result, cfg)
    return result


# --- stage 6 ----------------------------------------------------------------------------------------


@contextmanager
def finishing(guard: SignalGuard | None) -> Iterator[None]:
    """The end of a run whose training is complete and saved: a first stop signal lets the reports
    finish (a few seconds) instead of cutting them, a second one still aborts at once. The run
    then ends as finished, since nothing is left to resume."""
    if guard is None:
        yield
        return
    with guard.deferring(REPORTS_NOTE):
        yield
    if guard.stop_requested:
        logger.info(f"{guard.name} arrived after the training had finished: the reports were completed and the "
                    "run is complete")


def write_reports(run: RunDir, cfg: TrainConfig, data: PreparedData, history: list[dict[str, Any]],
                  run_config: dict[str, Any], device: torch.device, review: dict[str, torch.Tensor] | None = None,
                  set_aside: torch.Tensor | None = None) -> None:
    """After training: final curves, the temperature and "unknown" threshold fitted on the validation
    split (stored in the best model), evaluation of the best model on the validation split (and the
    test data, if given), the label review (``set_aside``: the images the run set aside), the model card and
    report.html. A failure here is
    reported but loses no training."""
    from .tools.evaluate import evaluate_arrays, match_classes, write_reports as write_evaluation
    from .model.loading import load_model_file
    from .tools.model_card import write_model_card
    from .tools.inference import PLAIN, TTA_VIEWS, predict_logits_and_features
    from .tools.plots import plot_training_curves

    try:
        plot_training_curves(history, run / CURVES, cfg.monitor)
        split = data.split
        selection = choose_weights(run, cfg, split, device)
        model, meta = load_model_file(run.best, device)
        meta["path"] = str(run.best)
        # The views every later prediction uses (stored with the calibration): the temperature, the thresholds
        # and the evaluations below are fitted and measured on what evaluate, predict and export will compute.
        meta["tta_views"] = [list(v) for v in (TTA_VIEWS if cfg.tta == "on" else PLAIN)]
        # One pass over the training split (with the views; the features of the plain image) serves the distance
        # check and the review.
        train_out = predict_logits_and_features(model, meta, split.train_images, device)
        meta["calibration"] = calibrate(run, model, meta, split, device, train_out)
        val = evaluate_arrays(model, meta, split.val_images, split.val_labels, device)
        val["data"] = {"source": "validation split" if cfg.val_data is None else str(cfg.val_data)}
        write_evaluation(val, run.path)
        test = None
        if data.test is not None:
            labels = match_classes(data.test.class_names, meta["class_names"], data.test.source)[data.test.labels]
            test = evaluate_arrays(model, meta, data.test.images, labels, device)
            test["data"] = {"source": data.test.source, "num_images": len(data.test)}
            write_evaluation(test, run.path, prefix="test_")
        rows = label_review(run, meta, split, review, train_out[0], set_aside)
        write_model_card(run.path, config=run_config, data_report=data.report, history=history, evaluation=val,
                         test_evaluation=test)
        run_report(run, history, meta, val, rows, data)
        held = int(split.calibration.sum())
        kept = f"best model (epoch {meta['epoch']})" if selection is None or selection.kept_epoch == selection.best_epoch else (
            f"final weights (epoch {meta['epoch']}; model_selection {selection.rule}: the best validation epoch, "
            f"{selection.best_epoch}, is not kept)")
        line = (f"{kept}: validation accuracy {100 * val['accuracy']:.2f}% on all "
                f"{val['num_samples']} validation images" + (f" ({held} kept apart for the temperature)" if held else ""))
        if test is not None:
            line += f", test accuracy {100 * test['accuracy']:.2f}% on {test['num_samples']} images"
        cal = meta["calibration"]
        line += f"; temperature {cal['temperature']:.3f}, ECE {100 * (val['ece'] or 0):.2f}%"
        line += f"; unknown under confidence {cal['unknown_threshold']:.3f}" + (
            f" or over feature distance {cal['feature_distance']['threshold']:.1f}" if "feature_distance" in cal else "")
        logger.info(line + f"; reports: {EVALUATION}, {CONFUSION}, {CURVES}, {MODEL_CARD}, {LABEL_REVIEW}, {REPORT}")
    except Exception as err:  # noqa: BLE001 - the trained model is safe on disk already
        logger.warning(f"the final reports could not be written ({type(err).__name__}: {err}); "
                       f"the model and checkpoints in {run} are complete")


def choose_weights(run: RunDir, cfg: TrainConfig, split: SplitData, device: torch.device) -> Selection | None:
    """Final or best-validation weights into the best model file (``model_selection``), chosen on the images
    that chose the epoch (not those kept for the temperature), as the trainer validated them: the plain
    image, whatever the test-time views (so a redrawn report repeats the choice)."""
    from .model.loading import model_from_state
    from .tools.inference import PLAIN, predict_logits
    from .training.selection import select_model

    images, labels = split.selection_part()

    def right(state: dict[str, Any]) -> torch.Tensor:
        candidate, meta = model_from_state(state, run.best, device)
        return predict_logits(candidate, meta, images, device, views=PLAIN).argmax(1) == labels.cpu()

    return select_model(run, cfg.model_selection, right)


def calibrate(run: RunDir, model: torch.nn.Module, meta: dict[str, Any], split: SplitData, device: torch.device,
              train_out: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Fit the temperature on the calibration part of the validation split (the images that did not
    pick the best epoch, which would flatter it), the "unknown" threshold on the whole split, and the
    feature distance (class means and shared precision from ``train_out``, the training split's logits
    and features) with its threshold on the whole split; store them in the best model."""
    from .tools.calibration import (ECE_BINS, KEEP_CORRECT, calibrated_probs, fit_distance_check, fit_temperature,
                                    unknown_threshold)
    from .tools.inference import predict_logits_and_features
    from .training.checkpoint_manager import add_to_best_model

    logits, val_features = predict_logits_and_features(model, meta, split.val_images, device)  # on the CPU
    labels, held = split.val_labels.cpu(), split.calibration.cpu()
    temperature = whole = fit_temperature(logits, labels)
    if bool(held.any()):
        # Fitted where the selection did not look, but never sharper than the whole split asks: the split
        # that chose the epoch can only flatter the model, so a colder fit than its own is the held-out
        # part's noise (a part with no error at all drives the fit to its bound).
        temperature = max(fit_temperature(logits[held], labels[held]), whole)
    threshold = unknown_threshold(calibrated_probs(logits, temperature), labels)
    calibration = {"temperature": temperature, "unknown_threshold": threshold,
                   "fitted_on": ("validation images kept apart from the choice of the epoch" if bool(held.any())
                                 else "validation split"),
                   "num_images": int(held.sum()) if bool(held.any()) else len(labels), "temperature_whole_split": whole,
                   "keep_correct": KEEP_CORRECT, "ece_bins": ECE_BINS}
    distance = fit_distance_check(train_out[1], split.train_labels, val_features, logits.argmax(1) == labels)
    if distance is not None:
        calibration["feature_distance"] = {**distance, "fitted_on": "training split (means, precision), validation "
                                           "split (threshold)"}
    add_to_best_model(run, {"calibration": calibration, "tta_views": meta["tta_views"]})
    return calibration


def label_review(run: RunDir, meta: dict[str, Any], split: SplitData, review: dict[str, torch.Tensor] | None,
                 logits: torch.Tensor, set_aside: torch.Tensor | None = None) -> list[dict[str, Any]] | None:
    """``label_review.csv``: the training images ranked by the run's area under the margin, with the best
    model's preferred label and loss on each (unaugmented) image, from its training-split ``logits``.
    None when the run kept no margins."""
    from .training.label_review import review_rows, write_review

    if review is None or review["margin_sum"].shape[0] != split.train_labels.shape[0]:
        return None
    losses = F.cross_entropy(logits, split.train_labels.cpu(), reduction="none")
    rows = review_rows(review, split.train_origin, split.train_labels, logits.argmax(1), losses, meta["class_names"], set_aside)
    write_review(run / LABEL_REVIEW, rows)
    return rows


def run_report(run: RunDir, history: list[dict[str, Any]], meta: dict[str, Any], val: dict[str, Any],
               rows: list[dict[str, Any]] | None, data: PreparedData) -> None:
    """``report.html`` of the run: everything above on one self-contained page."""
    from .tools.report import ReportInputs, write_report

    split = data.split
    write_report(run / REPORT, ReportInputs(
        title=f"Run report: {run.path.name}", history=history, evaluation=val, images=split.val_images,
        labels=split.val_labels, class_names=list(meta["class_names"]), review=rows, review_images=split.train_images,
        pictures={"curves": run / CURVES, "confusion": run / CONFUSION, "reliability": run / RELIABILITY},
        duplicates=data.report.get("duplicates"), duplicate_pictures=data.duplicate_pictures))


def log_best(result: RunResult, cfg: TrainConfig) -> None:
    """The closing line: the best epoch and where the files are."""
    if result.best is not None:
        kept = ""
        try:
            selection = load_checkpoint(result.best_model_path).get("selection") or {}
        except Exception:  # noqa: BLE001 - only the closing line's detail; the reports said what went wrong
            selection = {}
        if selection.get("kept_epoch") not in (None, result.best["epoch"]):
            kept = f"; {BEST} holds the final weights, epoch {selection['kept_epoch']} (model_selection {selection['rule']})"
        logger.info(f"best epoch {result.best['epoch']}: {cfg.monitor} {result.best['metric']:.4f}{kept}; files in "
                    f"{result.output_dir}/: " + ", ".join(GUIDE_ARTIFACTS))
