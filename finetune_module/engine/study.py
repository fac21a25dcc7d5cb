"""A sweep's Optuna study: where it is stored, how trials are drawn and pruned, what each trial
records, and the promotion of the best trial's model.

The study lives in a database that already exists or needs nothing started: a SQLite file by
default, or a PostgreSQL server (`postgresql://user:password@host/db`), so that several
processes or machines work on one study at once; each asks the study for its next trial, so no
trial is run twice. Optuna is an optional package (`pip install finetune-module[sweep]`);
nothing here imports it until a study is opened.
"""

import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_module.engine.files import (
    BEST_MODEL_DIR,
    atomic_directory,
    existing_directory,
    waiting_lock,
    write_json,
)
from finetune_module.errors import SettingsError, import_optional, mask_credentials

#: The study's file under the sweep's directory when no storage is given.
STUDY_FILE = "sweep.db"
#: The sweep directory's folder of trials: each trial's run directory is `trial-<number>` in it.
TRIALS_DIR = "trials"
#: In the promoted best model: which trial it came from.
SWEEP_TRIAL_FILE = "sweep_trial.json"
#: The file the sweep's workers take in turns to promote the best model and write the report.
PROMOTION_LOCK = ".sweep.lock"
#: Objectives a sweep may optimize: the metric and whether higher is better.
OBJECTIVES = {
    "eval_loss": "minimize",
    "rouge1": "maximize",
    "rouge2": "maximize",
    "rougeL": "maximize",
    "rougeLsum": "maximize",
    "accuracy": "maximize",
    "macro_f1": "maximize",
}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
#: How many hold-out answers each trial keeps in the study (for the report).
KEPT_ANSWERS = 20

logger = logging.getLogger(__name__)


def optuna_module() -> Any:
    """The optuna package, or a SettingsError saying how to install it."""
    optuna = import_optional("optuna", "A sweep")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(storage: str | None, sweep_dir: str) -> str:
    """The SQLAlchemy URL of the study's store: `sqlite:///<sweep_dir>/sweep.db` when none is
    given; `postgresql://...` (and `postgres://...`) as `postgresql+psycopg://...`, the driver
    this project pins; any other URL as it is."""
    if not storage:
        return f"sqlite:///{os.path.join(os.path.abspath(sweep_dir), STUDY_FILE)}"
    for scheme in ("postgresql://", "postgres://"):
        if storage.startswith(scheme):
            return "postgresql+psycopg://" + storage[len(scheme) :]
    if "://" not in storage:  # a file name: a SQLite file
        return f"sqlite:///{os.path.abspath(storage)}"
    return storage


def make_sampler(sampler: Any, seed: int | None) -> Any:
    """The Optuna sampler: "tpe" (default; Optuna's TPESampler, liar-aware for parallel
    workers) or "random", seeded with `seed`, or a sampler object as it is."""
    optuna = optuna_module()
    if not isinstance(sampler, str):
        return sampler
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SettingsError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")


def make_pruner(pruner: Any) -> Any:
    """The Optuna pruner: "median" (default: a trial whose validation loss after an epoch is
    worse than the median of earlier trials' at the same epoch stops, once 4 trials are done)
    or "none", or a pruner object as it is."""
    optuna = optuna_module()
    if not isinstance(pruner, str):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise SettingsError(f"pruner must be one of {', '.join(PRUNERS)}; got {pruner!r}.")


def open_study(
    url: str,
    study_name: str,
    direction: str,
    *,
    sampler: Any = "tpe",
    pruner: Any = "median",
    seed: int | None = None,
) -> Any:
    """The study `study_name` in the store at `url`, created if it does not exist yet, else
    joined (another worker may be running it). The worker that creates the study seeds its
    sampler with `seed` (the same seed draws the same trials); a worker that joins seeds its own
    from the process, so that two workers do not draw the same trials."""
    optuna = optuna_module()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///") :]) or ".", exist_ok=True)
    storage = _storage(optuna, url, engine_kwargs)
    pruner = make_pruner(pruner)
    try:
        return optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=direction,
            sampler=make_sampler(sampler, seed),
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=study_name,
            storage=storage,
            sampler=make_sampler(sampler, _joining_seed(seed)),
            pruner=pruner,
        )
    wanted = optuna.study.StudyDirection.MINIMIZE if direction == "minimize" else None
    wanted = wanted or optuna.study.StudyDirection.MAXIMIZE
    if study.direction != wanted:
        raise SettingsError(
            f"study {study_name!r} exists and is to {study.direction.name.lower()}, not to "
            f"{direction}: give another study_name or the study's own objective."
        )
    return study


def _storage(optuna: Any, url: str, engine_kwargs: dict[str, Any] | None, tries: int = 5) -> Any:
    """Optuna's storage at `url`, its tables created when the database has none yet. Workers
    that start together on a new database race to create the tables; the ones that lose find
    them made, on a second try."""
    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except Exception as e:  # the driver's own errors: no server, refused, bad URL
            reason = " ".join(str(getattr(e, "orig", None) or e).split())
            racing = (
                "already exists" in reason
                or "UniqueViolation" in type(getattr(e, "orig", None)).__name__
            )
            if racing and attempt < tries - 1:
                time.sleep(0.5 + random.random())
                continue
            raise SettingsError(
                f"storage {mask_credentials(url)}: cannot open it ({reason})."
            ) from e
    raise AssertionError("unreachable")


def _joining_seed(seed: int | None) -> int | None:
    """The sampler seed of a worker that joins a study: the sweep's seed mixed with this
    process, so that two workers draw different trials."""
    if seed is None:
        return None
    return random.Random(f"{seed}-{socket.gethostname()}-{os.getpid()}").randrange(2**31)


def trial_dir(sweep_dir: str, number: int) -> str:
    """A trial's run directory: `<sweep_dir>/trials/trial-<number>` (4 digits)."""
    return os.path.join(os.path.abspath(sweep_dir), TRIALS_DIR, f"trial-{number:04d}")


class PruningCallback(TrainerCallback):
    """Reports each evaluation's validation loss to an Optuna trial and stops the trial
    (raising `optuna.TrialPruned` from the Trainer) when the study's pruner says so.

    The step reported is the epoch for per-epoch evaluation (so trials of different batch sizes
    compare epoch to epoch), else the optimizer step. A study that maximizes (a ROUGE
    objective) is told the negative loss, so that higher is better there too."""

    def __init__(self, trial: Any, maximize: bool = False) -> None:
        self.trial, self.sign = trial, -1.0 if maximize else 1.0
        self.reported: list[tuple[int, float]] = []

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Reports the validation loss; raises `optuna.TrialPruned` when the trial should stop."""
        if not metrics or "eval_loss" not in metrics:
            return
        per_epoch = str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "epoch"
        step = round(state.epoch or 0) if per_epoch else state.global_step
        value = self.sign * float(metrics["eval_loss"])
        self.trial.report(value, step)
        self.reported.append((step, value))
        if self.trial.should_prune():
            optuna = optuna_module()
            raise optuna.TrialPruned(
                f"pruned after {'epoch' if per_epoch else 'step'} {step}: eval_loss "
                f"{metrics['eval_loss']:.4f}"
            )


def objective_value(metrics: Mapping[str, Any], objective: str) -> float:
    """The trial's objective from its `training_and_validation_set_metrics`: the best
    checkpoint's validation loss (`eval_loss`) or a validation score (`rougeL`, ...)."""
    if objective not in metrics or metrics[objective] is None:
        raise SettingsError(
            f"objective {objective!r} is not among this run's metrics "
            f"({', '.join(k for k in OBJECTIVES if k in metrics)})."
        )
    return float(metrics[objective])


def trial_record(
    metrics: Mapping[str, Any], predictions: list[tuple[str, str, str]]
) -> dict[str, Any]:
    """What a finished trial keeps in the study beside its parameters and value (Optuna user
    attributes), so that the report can be rebuilt from the study alone: its training
    throughput, its validation figures and its first `KEPT_ANSWERS` hold-out answers as
    (question, prediction, reference)."""
    shown = ("eval_loss", "train_loss", "rougeL", "accuracy", "global_step")
    return {
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "metrics": {key: metrics[key] for key in shown if metrics.get(key) is not None},
        "hold_out_answers": [list(row) for row in predictions[:KEPT_ANSWERS]],
    }


def best_trial_or_none(study: Any) -> Any:
    """The study's best finished trial, or None while no trial has finished."""
    try:
        return study.best_trial
    except ValueError:
        return None


def promote_best(study: Any, sweep_dir: str) -> str | None:
    """Copies the study's best trial's model to `<sweep_dir>/best_model` (atomically, one
    worker at a time: the model there is always one whole trial's, the best when it was
    written) unless it is there already; returns the best model's directory, or None when no
    trial of this machine has finished. `sweep_trial.json` in it names the trial."""
    target = os.path.join(os.path.abspath(sweep_dir), BEST_MODEL_DIR)
    with waiting_lock(os.path.join(sweep_dir, PROMOTION_LOCK)):
        best = best_trial_or_none(study)
        if best is None:
            return None
        source = existing_directory(
            os.path.join(best.user_attrs.get("trial_dir", ""), BEST_MODEL_DIR)
        )
        if not os.path.isdir(source):
            logger.warning("The best trial (%d) has no model on this machine.", best.number)
            return target if os.path.isdir(target) else None
        if promoted_trial(target) == best.number:
            return target
        with atomic_directory(target) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            write_json(
                os.path.join(staging, SWEEP_TRIAL_FILE),
                {
                    "study_name": study.study_name,
                    "trial": best.number,
                    "value": best.value,
                    "params": best.params,
                    "trial_dir": best.user_attrs.get("trial_dir"),
                },
            )
        logger.info("Best model: trial %d (%s %.4f)", best.number, "value", best.value)
        return target


def promoted_trial(best_model_dir: str) -> int | None:
    """The number of the trial whose model `best_model_dir` holds, or None."""
    try:
        with open(os.path.join(best_model_dir, SWEEP_TRIAL_FILE), encoding="utf-8") as f:
            return int(json.load(f)["trial"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
