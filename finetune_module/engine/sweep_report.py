"""The sweep report: one self-contained HTML page (plotly.js embedded, like the run report)
drawn from the Optuna study alone, so that any worker, or anyone with the study's store, can
rebuild it.

The trials table (parameters, objective, state, duration, training samples per second), the
optimization history, the parameters' importances, the parallel coordinates of parameters and
objective, and the best and worst finished trials' answers to the same hold-out questions.
"""

import logging
from typing import Any

from finetune_module.engine import html_report
from finetune_module.engine.study import best_trial_or_none, optuna_module

logger = logging.getLogger(__name__)

#: The ids of the report's figures, in page order.
FIGURE_IDS = ("history", "importances", "parallel-coordinates")


def _finished(study: Any) -> list[Any]:
    """The study's trials that finished with a value (state COMPLETE)."""
    optuna = optuna_module()
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def trials_table(study: Any) -> str:
    """Every trial, one row each: number, state (COMPLETE, PRUNED, RUNNING, FAIL), objective,
    duration, training samples per second, then each parameter."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    rows = []
    for trial in trials:
        duration = trial.user_attrs.get("duration_seconds")
        if duration is None and trial.duration is not None:
            duration = trial.duration.total_seconds()
        rows.append(
            [
                trial.number,
                trial.state.name,
                trial.value if trial.value is not None else "",
                duration if duration is not None else "",
                trial.user_attrs.get("train_samples_per_second") or "",
                *(trial.params.get(name, "") for name in names),
            ]
        )
    header = ["trial", "state", study.user_attrs.get("objective", "objective")]
    return html_report.table([*header, "duration (s)", "train samples/s", *names], rows, "trials")


def _drawn(what: str, draw: Any, div_id: str) -> str:
    """A figure drawn by one of Optuna's plotly functions, or a line saying why it cannot be
    drawn yet (too few finished trials, one value of every parameter)."""
    try:
        figure = draw()
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return f"<p>No {what} yet: {e}</p>"
    return html_report.figure_html(figure, div_id)


def history_figure(study: Any) -> str:
    """The objective of each finished trial and the best so far, against the trial number."""
    if not _finished(study):
        return "<p>No trial has finished yet: no optimization history.</p>"
    optuna = optuna_module()
    return _drawn(
        "optimization history",
        lambda: optuna.visualization.plot_optimization_history(study),
        FIGURE_IDS[0],
    )


def importances_figure(study: Any) -> str:
    """How much each parameter's value explains the objective (Optuna's fANOVA importances,
    seeded: the same study draws the same bars); needs two finished trials that differ, and
    scikit-learn (the `sweep` extra installs it; without it the page says so)."""
    finished = _finished(study)
    if len(finished) < 2:
        return (
            f"<p>Parameter importances need at least 2 finished trials; {len(finished)} "
            "finished so far.</p>"
        )
    optuna = optuna_module()
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        return (
            "<p>Parameter importances need scikit-learn (Optuna's fANOVA): "
            "<code>pip install finetune-module[sweep]</code> installs it.</p>"
        )
    return _drawn(
        "parameter importances",
        lambda: optuna.visualization.plot_param_importances(study, evaluator=evaluator),
        FIGURE_IDS[1],
    )


def parallel_figure(study: Any) -> str:
    """One line per finished trial through its parameters' values to its objective."""
    if not _finished(study):
        return "<p>No trial has finished yet: no parallel coordinates.</p>"
    optuna = optuna_module()
    return _drawn(
        "parallel coordinates",
        lambda: optuna.visualization.plot_parallel_coordinate(study),
        FIGURE_IDS[2],
    )


def best_and_worst_answers(study: Any) -> str:
    """The best and the worst finished trials' answers to the same hold-out questions (the
    ones both kept), with the reference answers."""
    finished = [t for t in _finished(study) if t.user_attrs.get("hold_out_answers")]
    if len(finished) < 2:
        return "<p>Two finished trials are needed to compare answers.</p>"
    best = best_trial_or_none(study)
    best = best if best in finished else finished[0]
    worst_key = max if study.direction.name == "MINIMIZE" else min
    worst = worst_key(finished, key=lambda t: t.value)
    worse = {row[0]: row[1] for row in worst.user_attrs["hold_out_answers"]}
    rows = [
        [question, reference, answer, worse[question]]
        for question, answer, reference in best.user_attrs["hold_out_answers"]
        if question in worse
    ]
    header = ["question", "reference", f"best: trial {best.number}", f"worst: trial {worst.number}"]
    return html_report.table(header, rows, "answers")


def glance(study: Any) -> str:
    """The headline: the objective, trials by state, the best trial and its parameters."""
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    objective = study.user_attrs.get("objective", "objective")
    rows: list[list[Any]] = [
        ["study", study.study_name],
        ["objective", f"{objective} ({study.direction.name.lower()})"],
        ["trials", ", ".join(f"{count} {state}" for state, count in sorted(states.items()))],
    ]
    best = best_trial_or_none(study)
    if best is not None:
        rows.append([f"best trial: {objective}", f"trial {best.number}: {best.value:.4f}"])
        rows += [[f"best trial: {name}", str(value)] for name, value in best.params.items()]
    return html_report.table(["", "value"], rows, "glance")


def sweep_report_html(study: Any) -> str:
    """The sweep's report page, from the study alone."""
    return html_report.page(
        f"Sweep report: {study.study_name}",
        [
            ("At a glance", "The study and its best trial so far.", glance(study)),
            (
                "Trials",
                "Every trial with its parameters. PRUNED: stopped early, its validation loss "
                "after an epoch being worse than earlier trials' at the same epoch; its "
                "objective is empty. Duration is the trial's wall time (training and "
                "evaluation).",
                trials_table(study),
            ),
            (
                "Optimization history",
                "The objective of each finished trial, and the best value found so far.",
                history_figure(study),
            ),
            (
                "Parameter importances",
                "How much of the objective's variation each parameter explains (fANOVA); with "
                "few trials, a rough guide only.",
                importances_figure(study),
            ),
            (
                "Parallel coordinates",
                "One line per finished trial, through its parameters to its objective: look "
                "for the values that the best lines share.",
                parallel_figure(study),
            ),
            (
                "Best and worst trial: hold-out answers",
                "The same hold-out questions answered by the best and the worst finished "
                "trials' models.",
                best_and_worst_answers(study),
            ),
        ],
    )
