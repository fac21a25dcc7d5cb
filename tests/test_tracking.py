"""MLflow tracking (run.py --mlflow, finetune_module.tracking) against a local file store."""

from pathlib import Path

import pandas as pd
import pytest

import run
from tests.conftest import EXAMPLE_DATA, QUICK, read_json

pytest.importorskip("mlflow", reason="mlflow is an optional extra (requirements-extras.txt)")

import mlflow
from mlflow.client import MlflowClient

from finetune_module.tracking import _param_value


def test_a_run_logs_params_metrics_training_curve_and_the_saved_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # a CSV file: this is also the end-to-end run of that source
    data = tmp_path / "qa.csv"
    pd.DataFrame(read_json(EXAMPLE_DATA)).to_csv(data, index=False)
    store = tmp_path / "mlruns"
    argv = [
        "--data", str(data), "--model-id", str(tiny_model_dir),
        "--output-dir", str(tmp_path / "out"), "--mlflow", str(store),
        "--mlflow-experiment", "qa-tests",
        "--max_steps", str(QUICK["max_steps"]), "--max-new-tokens", str(QUICK["max_new_tokens"]),
    ]  # fmt: skip
    assert run.main(argv) == 0

    client = MlflowClient(store.absolute().as_uri())
    experiment = client.get_experiment_by_name("qa-tests")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["data_path"] == str(data) and params["max_steps"] == str(QUICK["max_steps"])
    assert params["start"] == "base" and params["source"] == "file"
    metrics = logged.data.metrics
    saved = read_json(tmp_path / "out" / "best_model" / "metrics.json")
    for key in ("rouge1", "rougeL", "eval_loss", "train_loss"):
        assert metrics[key] == pytest.approx(saved["training_and_validation"][key])
    assert metrics["hold_out_rougeL"] == pytest.approx(saved["hold_out"]["rougeL"])
    curve = client.get_metric_history(logged.info.run_id, "trainer/eval_loss")
    assert [point.step for point in curve] == [QUICK["max_steps"]]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "best_model")}
    assert "best_model/adapter_model.safetensors" in artifacts
    assert "best_model/hold_out_predictions.csv" in artifacts


def test_params_never_show_a_password() -> None:
    assert _param_value("postgresql://me:hunter2@db/qa") == "postgresql://me:***@db/qa"
    assert _param_value(0.001) == 0.001 and _param_value(True) is True


def test_report_to_hands_the_trainers_metrics_to_its_integration(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "trainer-mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.absolute().as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trainer-report")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store, as --mlflow makes
    # the Trainer's callback keeps a URI set earlier in the process (by the test above)
    mlflow.set_tracking_uri(store.absolute().as_uri())
    argv = [
        "--data", str(EXAMPLE_DATA), "--model-id", str(tiny_model_dir), "--quiet",
        "--output-dir", str(tmp_path / "out"), "--report_to", "mlflow",
        "--max_steps", str(QUICK["max_steps"]), "--max-new-tokens", str(QUICK["max_new_tokens"]),
    ]  # fmt: skip
    assert run.main(argv) == 0
    client = MlflowClient(store.absolute().as_uri())
    experiment = client.get_experiment_by_name("trainer-report")
    (logged,) = client.search_runs([experiment.experiment_id])
    # the Trainer's own logging: its evaluation loss and arguments, not our run's summary
    saved = read_json(tmp_path / "out" / "best_model" / "metrics.json")
    assert logged.data.metrics["eval_loss"] == pytest.approx(
        saved["training_and_validation"]["eval_loss"]
    )
    assert logged.data.params["max_steps"] == str(QUICK["max_steps"])
    assert "rougeL" not in logged.data.metrics


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bogus", "report_to: unknown integration 'bogus'; known: none, all, azure_ml"),
        ("clearml", "report_to: clearml is not installed here (pip install clearml"),
    ],
)
def test_report_to_refuses_an_unknown_or_missing_integration(
    value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--data",
        str(EXAMPLE_DATA),
        "--output-dir",
        str(tmp_path / "out"),
        "--report_to",
        value,
    ]
    assert run.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()
