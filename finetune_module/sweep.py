"""Hyperparameter sweeps: many fine-tunes of one data set with Optuna, the best one kept.

```python
from finetune_module.sweep import sweep

result = sweep(
    {"data_path": "example-support-dataset.json", "output_dir": "my-sweep"},
    {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "r": [4, 8, 16]},
    n_trials=6,
)
print(result.best_params, result.best_model_dir, result.report_path)
```
The data is read, split and tokenized once; every trial runs the rest of the dataflow on those
values (Hamilton `overrides`) with its own settings, into its own directory
`<output_dir>/trials/trial-<number>/` (checkpoints, best model, report). Optuna's TPE sampler
draws each trial's settings from the search space (`finetune_module.engine.search_space`), and
a trial whose validation loss after an epoch is worse than earlier trials' stops early (pruned).
After each trial the study's best trial's model is copied, whole, to `<output_dir>/best_model`
(which `predict` and `export_merged` take like any run's). The study is stored in
`<output_dir>/sweep.db` (SQLite) unless `storage` names another store, e.g. PostgreSQL, where
several workers, on one machine or many, share one study: each runs `n_trials` trials of it.
`<output_dir>/sweep_report.html` shows the trials (`finetune_module.engine.sweep_report`).

Needs the optional package optuna (`pip install finetune-module[sweep]`).
"""

import dataclasses
import gc
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from hamilton import driver

import finetune_module
from finetune_module.engine.files import (
    release_directory,
    waiting_lock,
    write_text_atomically,
)
from finetune_module.engine.run_info import labelled_run
from finetune_module.engine.search_space import Dimension, parse_search_space
from finetune_module.engine.study import (
    OBJECTIVES,
    PROMOTION_LOCK,
    PruningCallback,
    best_trial_or_none,
    objective_value,
    open_study,
    optuna_module,
    promote_best,
    storage_url,
    trial_dir,
    trial_record,
)
from finetune_module.engine.sweep_report import sweep_report_html
from finetune_module.engine.trainer import trainer_callbacks
from finetune_module.errors import SettingsError, mask_credentials
from finetune_module.settings import DEFAULT_OUTPUT_DIR

#: The nodes every trial shares, computed once per worker: the records, their split, the
#: tokenizer, the token ids, the length caps and the tokenized sets.
SHARED_NODES = (
    "raw_records",
    "data_label",
    "qa_table",
    "train_set",
    "validation_set",
    "hold_out_set",
    "prompt_texts",
    "tokenizer",
    "source_token_ids",
    "target_token_ids",
    "source_length_cap",
    "target_length_cap",
    "tokenized_train",
    "tokenized_validation",
    "tokenized_hold_out",
)
#: Settings of the `settings` node that the shared nodes depend on (the split, the length caps,
#: the tokenizer's model) and those the sweep sets itself: the same in every trial.
FIXED_SETTINGS = (
    "random_state",
    "train_size",
    "validation_size",
    "split_strategy",
    "max_source_length",
    "max_target_length",
    "length_percentile",
    "model_id",
    "model_type",
    "trust_remote_code",
    "output_dir",
    "resume_from_checkpoint",
    "presaved_model_path",
)
#: Names a search space may use for a setting, besides the setting's own.
SEARCH_ALIASES = {"lora_r": "r"}
#: The sweep's report, in its output directory.
SWEEP_REPORT_FILE = "sweep_report.html"
DEFAULT_STUDY_NAME = "finetune-sweep"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What a worker's sweep leaves: the study (its name and store, password masked), how many
    trials this worker ran and how they ended, the study's best trial (number, objective,
    settings as Optuna stores them: a list choice as its items joined by commas), the promoted
    best model's directory and the report's path."""

    study_name: str
    storage: str
    trials_run: int
    states: dict[str, int]
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_model_dir: str | None
    report_path: str


def searchable_settings(dr: driver.Driver) -> tuple[set[str], set[str]]:
    """The settings a search space may name (the dataflow's inputs) and those among them that
    must stay the same in every trial: the inputs that the shared nodes read (data_path, the
    keys, the prompt template, ...), and `FIXED_SETTINGS`."""
    inputs = {v.name for v in dr.list_available_variables() if v.is_external_input}
    inputs -= {*finetune_module.CONFIG_KEYS, "start"}  # the driver's config, not inputs
    shared = {v.name for v in dr.what_is_upstream_of(*SHARED_NODES)} - {"settings"}
    read = {
        dependency.name
        for name in shared
        for dependency in dr.graph.nodes[name].dependencies
        if dependency.name in inputs
    }
    return inputs, (read | set(FIXED_SETTINGS)) & inputs


def search_dimensions(dr: driver.Driver, search_space: Mapping[str, Any]) -> tuple[Dimension, ...]:
    """The search space checked against the driver's inputs and their types (a SettingsError
    with one line per problem otherwise)."""
    from hamilton import htypes

    if not isinstance(search_space, Mapping):
        raise SettingsError("search_space must be a mapping of setting names to ranges or lists.")
    known, fixed = searchable_settings(dr)
    types = {v.name: v.type for v in dr.list_available_variables() if v.is_external_input}
    spec = {SEARCH_ALIASES.get(str(name), str(name)): entry for name, entry in search_space.items()}
    return parse_search_space(
        spec,
        known,
        fixed=fixed,
        accepts=lambda name, value: htypes.check_input_type(types[name], value),
    )


def _validated_driver(
    inputs: Mapping[str, Any],
    search_space: Mapping[str, Any],
    config: Mapping[str, Any],
    cache: str | None,
    adapters: Sequence[Any],
) -> tuple[driver.Driver, tuple[Dimension, ...]]:
    """The driver of the trials and the search space's dimensions, everything checked."""
    dr = finetune_module.build_driver("base", cache=cache, adapters=adapters, **config)
    dimensions = search_dimensions(dr, search_space)
    example = {d.name: d.examples()[0] for d in dimensions}
    outputs = list(finetune_module.DEFAULT_OUTPUTS)
    try:
        dr.validate_execution(outputs, inputs={**inputs, **example})
    except ValueError as e:
        raise SettingsError(" ".join(str(e).split())) from e
    if "data_path" not in inputs:
        raise SettingsError("data_path is required.")
    return dr, dimensions


@dataclasses.dataclass
class _Trials:
    """Runs one trial after another on one driver, with the shared values."""

    dr: driver.Driver
    dimensions: tuple[Dimension, ...]
    inputs: dict[str, Any]
    shared: dict[str, Any]
    sweep_dir: str
    objective: str
    maximize: bool

    def __call__(self, trial: Any) -> float:
        """One trial: its settings drawn, the dataflow run into its own directory, its
        objective returned (or `optuna.TrialPruned` raised when it stopped early)."""
        optuna = optuna_module()
        settings = {d.name: d.suggest(trial) for d in self.dimensions}
        directory = trial_dir(self.sweep_dir, trial.number)
        trial.set_user_attr("trial_dir", directory)
        trial.set_user_attr("host", socket.gethostname())
        logger.info("Trial %d: %s", trial.number, settings)
        began = time.perf_counter()
        try:
            with (
                trainer_callbacks([PruningCallback(trial, self.maximize)]),
                labelled_run(sweep=trial.study.study_name, trial=trial.number),
            ):
                result = self.dr.execute(
                    list(finetune_module.DEFAULT_OUTPUTS),
                    inputs={**self.inputs, **settings, "output_dir": directory},
                    overrides=self.shared,
                )
        except optuna.TrialPruned:
            logger.info("Trial %d pruned.", trial.number)
            raise
        finally:
            trial.set_user_attr("duration_seconds", round(time.perf_counter() - began, 3))
            release_directory(directory)
            gc.collect()  # the trial's models, held in Hamilton's reference cycles
        metrics = result["training_and_validation_set_metrics"]
        for key, value in trial_record(metrics, result["hold_out_set_predictions"]).items():
            trial.set_user_attr(key, value)
        return objective_value(metrics, self.objective)


def write_sweep_report(study: Any, sweep_dir: str) -> str:
    """Writes the study's report to `<sweep_dir>/sweep_report.html` (atomically, one worker at
    a time) and returns its path."""
    path = os.path.join(os.path.abspath(sweep_dir), SWEEP_REPORT_FILE)
    with waiting_lock(os.path.join(sweep_dir, PROMOTION_LOCK)):
        write_text_atomically(path, sweep_report_html(study))
    return path


def sweep(
    inputs: Mapping[str, Any],
    search_space: Mapping[str, Any],
    *,
    n_trials: int = 10,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY_NAME,
    objective: str = "eval_loss",
    sampler: Any = "tpe",
    pruner: Any = "median",
    config: Mapping[str, Any] | None = None,
    cache: str | None = None,
    adapters: Sequence[Any] = (),
) -> SweepResult:
    """Runs `n_trials` trials of the study `study_name` (created, or joined when another worker
    made it), each a fine-tune with the settings `inputs` and its own draw from `search_space`;
    promotes the study's best trial's model to `<output_dir>/best_model` and writes
    `<output_dir>/sweep_report.html`. Everything is checked before anything runs.

    :param inputs: the dataflow's inputs that are the same in every trial (data_path,
        model_id, output_dir: the sweep's directory, default ./finetuned-model, ...).
    :param search_space: the settings that vary, each a range or a list of choices (see
        `finetune_module.engine.search_space`), e.g. {"learning_rate": {"low": 1e-4,
        "high": 1e-2, "log": True}, "r": [4, 8, 16]}.
    :param n_trials: how many trials this worker runs.
    :param storage: where the study lives: a database URL (`sqlite:///path.db`,
        `postgresql://user:password@host/db`) or a file name (SQLite); default
        `<output_dir>/sweep.db`.
    :param study_name: the study's name in the store; workers that give the same name share it.
    :param objective: "eval_loss" (default: the best checkpoint's validation loss, minimized)
        or a validation score, maximized: "rouge1", "rouge2", "rougeL", "rougeLsum",
        "accuracy", "macro_f1".
    :param sampler: "tpe" (default, seeded with the inputs' seed) or "random", or an Optuna
        sampler.
    :param pruner: "median" (default) or "none", or an Optuna pruner.
    :param config: the driver config besides start (source, model_type, use_lora).
    :param cache: a directory for Hamilton's cache (see `build_driver`).
    :param adapters: more Hamilton driver adapters (tracking, progress), attached to every run.
    """
    if objective not in OBJECTIVES:
        raise SettingsError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise SettingsError(f"n_trials must be a whole number of at least 1; got {n_trials!r}.")
    optuna_module()  # installed, or one line saying how to install it
    inputs = dict(inputs)
    sweep_dir = os.path.abspath(inputs.pop("output_dir", DEFAULT_OUTPUT_DIR))
    dr, dimensions = _validated_driver(inputs, search_space, dict(config or {}), cache, adapters)
    url = storage_url(storage, sweep_dir)
    direction = OBJECTIVES[objective]
    seed = inputs.get("seed", 42)
    study = open_study(url, study_name, direction, sampler=sampler, pruner=pruner, seed=seed)
    study.set_user_attr("objective", objective)
    shared = dr.execute(list(SHARED_NODES), inputs={**inputs, "output_dir": sweep_dir})
    run = _Trials(dr, dimensions, inputs, shared, sweep_dir, objective, direction == "maximize")
    ran: list[Any] = []

    def after_trial(study: Any, trial: Any) -> None:
        ran.append(trial)
        promote_best(study, sweep_dir)

    study.optimize(run, n_trials=n_trials, callbacks=[after_trial], gc_after_trial=False)
    best_model_dir = promote_best(study, sweep_dir)
    report = write_sweep_report(study, sweep_dir)
    best = best_trial_or_none(study)
    states: dict[str, int] = {}
    for trial in ran:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    return SweepResult(
        study_name=study_name,
        storage=mask_credentials(url),
        trials_run=len(ran),
        states=states,
        best_trial=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_model_dir=best_model_dir,
        report_path=report,
    )


__all__ = [
    "DEFAULT_STUDY_NAME",
    "FIXED_SETTINGS",
    "SHARED_NODES",
    "SWEEP_REPORT_FILE",
    "SweepResult",
    "search_dimensions",
    "searchable_settings",
    "sweep",
    "write_sweep_report",
]
