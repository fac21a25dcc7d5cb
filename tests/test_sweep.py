"""Sweeps: a study of 6 trials on the tiny model (data and tokenization once, a pruned trial, each
trial's own directory, the best model promoted, the report drawn in a real browser); search
spaces checked before anything runs; `finetune sweep` end to end; two workers on one study in
PostgreSQL (when CI's server is there)."""

import collections
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hamilton.lifecycle import api

from finetune_module import cli
from finetune_module.engine.files import BEST_MODEL_DIR
from finetune_module.engine.search_space import parse_search_space
from finetune_module.engine.study import SWEEP_TRIAL_FILE, PruningCallback, storage_url
from finetune_module.engine.sweep_report import FIGURE_IDS
from finetune_module.errors import SettingsError
from tests.conftest import EXAMPLE_DATA, REPO, read_json
from tests.test_report import CHROMIUM, _chromium

optuna = pytest.importorskip("optuna")

from finetune_module.sweep import SWEEP_REPORT_FILE, sweep  # noqa: E402

SPACE = {
    "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
    "lora_r": [2, 4],
    "num_train_epochs": {"low": 1, "high": 2},
    "target_modules": [["q", "v"], ["q", "k", "v", "o"]],
}
PRUNED = 2  # the trial the test's pruner stops after its first evaluation
POSTGRES_URL = "FINETUNE_TEST_POSTGRES_URL"


class PruneTrials(optuna.pruners.BasePruner):
    """Prunes the trials of the given numbers at their first report, and no other."""

    def __init__(self, numbers: set[int]) -> None:
        self.numbers = numbers

    def prune(self, study: Any, trial: Any) -> bool:
        return trial.number in self.numbers


class NodeCounter(api.NodeExecutionHook):
    """Counts how often each node of the dataflow ran."""

    def __init__(self) -> None:
        self.runs: collections.Counter[str] = collections.Counter()

    def run_before_node_execution(self, *, node_name: str, **kwargs: Any) -> None:
        self.runs[node_name] += 1

    def run_after_node_execution(self, **kwargs: Any) -> None:
        pass


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread while a sweep runs in this process: on a shared, loaded machine the tiny
    model's steps are several times faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 records of the example data."""
    path = tmp_path_factory.mktemp("data") / "qa.json"
    path.write_text(json.dumps(read_json(EXAMPLE_DATA)[:40]), encoding="utf-8")
    return path


def fixed_inputs(data: Path, model: Path, output_dir: Path) -> dict[str, Any]:
    """The settings of every trial: a small split, short answers, no progress output."""
    return {
        "data_path": str(data),
        "input_text_key": "question",
        "output_text_key": "reply",
        "model_id": str(model),
        "output_dir": str(output_dir),
        "train_size": 0.75,
        "validation_size": 0.5,
        "max_new_tokens": 4,
        "cpu_speedups": False,
        "quiet": True,
    }


@pytest.fixture(scope="module")
def six_trials(
    small_data: Path,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    one_thread: None,
) -> dict[str, Any]:
    """A sweep of 6 trials of the tiny model; trial 2 is pruned."""
    output_dir = tmp_path_factory.mktemp("sweep")
    counter = NodeCounter()
    result = sweep(
        fixed_inputs(small_data, tiny_model_dir, output_dir),
        SPACE,
        n_trials=6,
        pruner=PruneTrials({PRUNED}),
        adapters=[counter],
    )
    study = optuna.load_study(
        study_name=result.study_name, storage=storage_url(None, str(output_dir))
    )
    return {"result": result, "study": study, "runs": counter.runs, "output_dir": output_dir}


def test_six_trials_each_in_its_own_directory(six_trials: dict[str, Any]) -> None:
    study, result = six_trials["study"], six_trials["result"]
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6)) and result.trials_run == 6
    states = {t.number: t.state.name for t in trials}
    assert states == {n: "PRUNED" if n == PRUNED else "COMPLETE" for n in range(6)}
    assert result.states == {"COMPLETE": 5, "PRUNED": 1}
    for trial in trials:
        directory = Path(trial.user_attrs["trial_dir"])
        assert directory == six_trials["output_dir"] / "trials" / f"trial-{trial.number:04d}"
        assert trial.user_attrs["duration_seconds"] > 0
        assert set(trial.params) == {"learning_rate", "r", "num_train_epochs", "target_modules"}
        best_model = directory / BEST_MODEL_DIR
        if trial.number == PRUNED:  # stopped after its first evaluation: no model saved
            assert not best_model.exists() and len(trial.intermediate_values) == 1
            continue
        assert trial.value == pytest.approx(read_json(best_model / "metrics.json")[
            "training_and_validation"]["eval_loss"])  # fmt: skip
        assert trial.user_attrs["train_samples_per_second"] > 0
        epochs = trial.params["num_train_epochs"]
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
        for name in ("adapter_model.safetensors", "report.html", "hold_out_predictions.csv"):
            assert (best_model / name).is_file()
        # the trial's own report says which sweep and trial it was, and its drawn settings
        ran = read_json(best_model / "run_info.json")
        assert ran["part_of"] == {"sweep": result.study_name, "trial": str(trial.number)}
        assert ran["settings_changed"]["learning_rate"]["value"] == trial.params["learning_rate"]
        settings = read_json(best_model / "adapter_config.json")
        assert settings["r"] == trial.params["r"]
        assert sorted(settings["target_modules"]) == sorted(
            trial.params["target_modules"].split(",")
        )


def test_data_and_tokenization_ran_once(six_trials: dict[str, Any]) -> None:
    runs = six_trials["runs"]
    for node in ("raw_records", "qa_table", "tokenizer", "source_token_ids", "tokenized_train"):
        assert runs[node] == 1, node
    assert runs["fitted_weights"] == 6  # every trial trained (one stopped early) ...
    assert runs["save_best_models"] == 5  # ... and every finished one saved its model


def test_the_best_trials_model_is_promoted(six_trials: dict[str, Any]) -> None:
    study, result = six_trials["study"], six_trials["result"]
    best = study.best_trial
    assert best.value == min(t.value for t in study.trials if t.value is not None)
    assert (result.best_trial, result.best_value) == (best.number, best.value)
    promoted = Path(result.best_model_dir)
    assert promoted == six_trials["output_dir"] / BEST_MODEL_DIR
    assert read_json(promoted / SWEEP_TRIAL_FILE)["trial"] == best.number
    source = Path(best.user_attrs["trial_dir"]) / BEST_MODEL_DIR
    for name in ("adapter_model.safetensors", "hold_out_predictions.csv", "metrics.json"):
        assert (promoted / name).read_bytes() == (source / name).read_bytes()
    answers = [row[1] for row in best.user_attrs["hold_out_answers"]]
    assert answers == json.loads(json.dumps(answers)) and answers  # kept in the study


def test_sweep_report_shows_trials_figures_and_answers(six_trials: dict[str, Any]) -> None:
    page = (six_trials["output_dir"] / SWEEP_REPORT_FILE).read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>") and len(page) > 1_000_000  # plotly.js inside
    assert not re.search(r"<script[^>]*\bsrc=", page)
    for figure_id in FIGURE_IDS:
        assert f'id="{figure_id}"' in page
    assert "<td>PRUNED</td>" in page and page.count("<td>COMPLETE</td>") == 5
    best = six_trials["study"].best_trial
    assert f"best: trial {best.number}" in page and "worst: trial" in page
    question = best.user_attrs["hold_out_answers"][0][0]
    assert question in page


def test_without_scikit_learn_the_report_says_what_importances_need(
    six_trials: dict[str, Any],
) -> None:
    # a process where scikit-learn cannot be imported, as with optuna installed on its own
    script = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import optuna\n"
        "from finetune_module.engine.sweep_report import importances_figure\n"
        "from finetune_module.engine.study import storage_url\n"
        f"study = optuna.load_study(study_name={six_trials['study'].study_name!r}, "
        f"storage=storage_url(None, {str(six_trials['output_dir'])!r}))\n"
        "print(importances_figure(study))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("<p>Parameter importances need scikit-learn")
    assert "finetune-module[sweep]" in done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_sweep_report_renders_in_headless_chromium(
    six_trials: dict[str, Any], tmp_path: Path
) -> None:
    out = _chromium(six_trials["output_dir"] / SWEEP_REPORT_FILE, tmp_path / "p", "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "\n".join(console)
    found = [
        (m.start(), m.group(1))
        for m in re.finditer('id="({})"'.format("|".join(FIGURE_IDS)), out.stdout)
    ]
    assert [name for _, name in found] == list(FIGURE_IDS)
    ends = [start for start, _ in found[1:]] + [len(out.stdout)]
    for (start, name), end in zip(found, ends, strict=True):
        assert 'class="main-svg"' in out.stdout[start:end], f"figure {name} was not drawn"


# --- search spaces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"no_such": [1, 2]}, "unknown setting 'no_such'; settings that may vary: "),
        ({"data_path": ["a", "b"]}, "data_path cannot vary between trials"),
        ({"learning_rate": {"low": 1e-2, "high": 1e-3}}, "low must be below high"),
        ({"learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "a log range needs low above 0"),
        ({"learning_rate": {"low": 1e-4}}, "a range needs both low and high"),
        ({"learning_rate": {"low": 1e-4, "high": 1e-3, "lg": True}}, "unknown keys lg"),
        ({"r": {"low": 1.5, "high": 8.0}}, "r: 1.5 is not a value of this setting's type"),
        ({"r": []}, "choices must be a non-empty list"),
        ({"r": 8}, "give a range {low, high} or a list of choices"),
        ({"target_modules": [["q"], ["q"]]}, "the choices repeat a value"),
    ],
)
def test_bad_search_spaces_are_refused_with_one_line_each(
    space: dict[str, Any], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"data_path": str(EXAMPLE_DATA), "search_space": space}))
    assert cli.main(["sweep", "--config", str(config), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: search_space") and expected in err
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_every_problem_of_a_search_space_gets_its_own_line() -> None:
    with pytest.raises(SettingsError) as raised:
        parse_search_space(
            {"a": [1], "b": {"low": 2, "high": 1}, "c": "x"}, known={"a", "b", "c"}, fixed={"a"}
        )
    lines = str(raised.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("search_space: a cannot vary between trials")
    assert lines[1].startswith("search_space: b: low must be below high")
    assert lines[2].startswith("search_space: c: give a range")


def test_ranges_and_list_choices_are_drawn_as_the_settings_values() -> None:
    dimensions = parse_search_space(
        {"learning_rate": {"low": "1e-4", "high": 1e-2, "log": True}, "t": [["q", "v"], ["q"]]},
        known={"learning_rate", "t"},
    )
    trial = optuna.trial.FixedTrial({"learning_rate": 1e-3, "t": "q,v"})
    assert [d.suggest(trial) for d in dimensions] == [1e-3, ["q", "v"]]
    assert dimensions[0].low == 1e-4  # YAML reads 1e-4 as text: taken as the number


def test_pruning_callback_reports_each_epoch_and_stops_a_pruned_trial() -> None:
    reported: list[tuple[float, int]] = []

    class Trial:
        def report(self, value: float, step: int) -> None:
            reported.append((value, step))

        def should_prune(self) -> bool:
            return len(reported) == 2

    callback = PruningCallback(Trial())
    args = type("Args", (), {"eval_strategy": "epoch"})()
    state = type("State", (), {"epoch": 1.0, "global_step": 5})()
    callback.on_evaluate(args, state, None, metrics={"eval_loss": 3.0})
    state.epoch = 2.0
    with pytest.raises(optuna.TrialPruned, match="pruned after epoch 2"):
        callback.on_evaluate(args, state, None, metrics={"eval_loss": 4.0})
    assert reported == [(3.0, 1), (4.0, 2)]
    maximizing = PruningCallback(Trial(), maximize=True)
    reported.clear()
    maximizing.on_evaluate(args, state, None, metrics={"eval_loss": 3.0})
    assert reported == [(-3.0, 2)]  # a study that maximizes is told higher is better


def test_storage_urls() -> None:
    assert storage_url(None, "/runs/s") == "sqlite:////runs/s/sweep.db"
    assert storage_url("postgresql://u:p@h/db", "x") == "postgresql+psycopg://u:p@h/db"
    assert storage_url("postgres://u:p@h/db", "x") == "postgresql+psycopg://u:p@h/db"
    assert storage_url("/tmp/s.db", "x") == "sqlite:////tmp/s.db"


# --- the command line ---------------------------------------------------------------------------


def _config(path: Path, data: Path, model: Path, output_dir: Path, **more: Any) -> Path:
    """A sweep's YAML file: fixed settings, a small search space, 1-step trials."""
    settings = {**fixed_inputs(data, model, output_dir), "max_steps": 1, **more}
    settings["search_space"] = {"learning_rate": {"low": "1e-3", "high": "1e-2", "log": True}}
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def test_finetune_sweep_from_a_config_file(
    small_data: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path / "sweep.yaml", small_data, tiny_model_dir, out, n_trials=2)
    assert cli.main(["sweep", "--config", str(config), "--r", "4", "--pruner", "none"]) == 0
    printed = capsys.readouterr().out
    assert "Ran 2 trials" in printed and f"Best model: {out / BEST_MODEL_DIR}" in printed
    promoted = read_json(out / BEST_MODEL_DIR / SWEEP_TRIAL_FILE)
    assert read_json(out / BEST_MODEL_DIR / "adapter_config.json")["r"] == 4  # the flag's
    assert (out / SWEEP_REPORT_FILE).is_file() and (out / "sweep.db").is_file()
    # a second worker joins the same study (the file is the default store) and runs one more
    assert cli.main(["sweep", "--config", str(config), "--n-trials", "1"]) == 0
    study = optuna.load_study(study_name="finetune-sweep", storage=storage_url(None, str(out)))
    assert len(study.trials) == 3 and promoted["trial"] in {t.number for t in study.trials}


# --- two workers, one study in PostgreSQL -------------------------------------------------------


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL)
    if not url:
        pytest.skip(f"no PostgreSQL server: {POSTGRES_URL} is not set (.ci/run starts one)")
    pytest.importorskip("psycopg")
    return url


@pytest.mark.slow  # two processes, each importing torch and running two trials: about a minute
def test_two_workers_share_one_study_in_postgres(
    postgres_url: str, small_data: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path / "sweep.yaml", small_data, tiny_model_dir, out)
    name = f"test-{uuid.uuid4().hex[:12]}"  # a fresh study each run
    command = [sys.executable, "-m", "finetune_module", "sweep", "--config", str(config)]
    command += ["--storage", postgres_url, "--study-name", name, "--n-trials", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            command,
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
        assert "Ran 2 trials" in stdout and "finetune:***@" in stdout  # password masked
    storage = storage_url(postgres_url, str(out))
    study = optuna.load_study(study_name=name, storage=storage)
    try:
        trials = study.get_trials()
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # none lost, none run twice
        assert len({t._trial_id for t in trials}) == 4
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        directories = {t.user_attrs["trial_dir"] for t in trials}
        assert len(directories) == 4 and all(Path(d).is_dir() for d in directories)
        best = study.best_trial
        promoted = out / BEST_MODEL_DIR
        assert read_json(promoted / SWEEP_TRIAL_FILE)["trial"] == best.number
        source = Path(best.user_attrs["trial_dir"]) / BEST_MODEL_DIR
        weights = "adapter_model.safetensors"
        assert (promoted / weights).read_bytes() == (source / weights).read_bytes()
        assert not list(out.glob(f".{BEST_MODEL_DIR}.tmp-*"))  # no staging left behind
    finally:
        optuna.delete_study(study_name=name, storage=storage)
