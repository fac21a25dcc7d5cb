"""Tracking (optional): each run's settings, metrics and saved model, logged to MLflow.

Built on Hamilton's MLflow adapter (`hamilton.plugins.h_mlflow.MLFlowTracker`): it opens an
MLflow run around every `dr.execute(...)` and logs the driver config and the inputs as params and
the dataflow as `hamilton_graph.json`. The tracker here masks credentials in those params and
logs what this dataflow produces: the training curve (from the fitted weights, so a cached re-run
logs it too), the validation and hold-out metrics, and the saved directory as artifacts.

```python
from finetune_module.tracking import mlflow_tracker

dr = (driver.Builder().with_config({"start": "base"}).with_modules(*finetune_module.MODULES)
      .with_adapters(mlflow_tracker()).build())   # local store ./mlruns; or tracking_uri=...
```
Needs the optional package mlflow-skinny (`pip install -r requirements-extras.txt`).
"""

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_module.errors import import_optional, mask_credentials

mlflow = import_optional("mlflow", "Tracking with MLflow")
h_mlflow = import_optional("hamilton.plugins.h_mlflow", "Tracking with MLflow")
mlflow_entities = import_optional("mlflow.entities", "Tracking with MLflow")

DEFAULT_EXPERIMENT = "finetune"
DEFAULT_TRACKING_DIR = "mlruns"


def _param_value(value: Any) -> Any:
    """An input as an MLflow param: numbers as they are, anything else as text with any URL
    password masked."""
    if isinstance(value, bool | int | float):
        return value
    return mask_credentials(str(value))


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a metrics dictionary, keys prefixed."""
    return {
        f"{prefix}{key}": float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class FinetuneMLflowTracker(h_mlflow.MLFlowTracker):
    """Hamilton's MLflow adapter, logging this dataflow's metrics and saved model."""

    def run_before_graph_execution(self, *, inputs: dict[str, Any], **kwargs: Any) -> None:
        """Opens the MLflow run; inputs become params, with credentials masked."""
        masked = {name: _param_value(value) for name, value in (inputs or {}).items()}
        super().run_before_graph_execution(inputs=masked, **kwargs)

    def _log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        """One batch of metrics at one step."""
        now = int(time.time() * 1000)
        metrics = [mlflow_entities.Metric(k, v, now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def _log_training_curve(self, fitted_weights: Any) -> None:
        """The trainer's log history (loss, eval_loss, learning_rate, ...) as `trainer/*` metrics
        by step."""
        for entry in fitted_weights.trainer_state.log_history:
            self._log_metrics(_numbers(entry, "trainer/"), step=int(entry.get("step", 0)))

    def _log_saved_directory(self, directory: str) -> None:
        """The saved model or evaluation directory's files, under its own name."""
        self.client.log_artifacts(self.run_id, directory, os.path.basename(directory))

    def run_after_node_execution(
        self, *, node_name: str, node_tags: dict, result: Any, success: bool = True, **kwargs: Any
    ) -> None:
        """Logs the results of the nodes this dataflow tracks (computed or taken from cache)."""
        if node_tags.get("hamilton.data_saver"):
            super().run_after_node_execution(
                node_name=node_name, node_tags=node_tags, result=result, **kwargs
            )
            return
        log = _NODE_LOGS.get(node_name)
        if success and log is not None:
            log(self, result)


# node name -> how its result is logged
_NODE_LOGS: dict[str, Callable[[FinetuneMLflowTracker, Any], None]] = {
    "fitted_weights": FinetuneMLflowTracker._log_training_curve,
    "training_and_validation_set_metrics": lambda t, r: t._log_metrics(_numbers(r)),
    "finetuned_hold_out_metrics": lambda t, r: t._log_metrics(_numbers(r, "hold_out_")),
    "save_best_models": FinetuneMLflowTracker._log_saved_directory,
}


def _is_file_store(tracking_uri: str) -> bool:
    """Whether the URI names a directory (MLflow's file store) rather than a server or database."""
    return "://" not in tracking_uri or tracking_uri.startswith("file:")


def mlflow_tracker(
    tracking_uri: str | None = None, experiment_name: str = DEFAULT_EXPERIMENT, **options: Any
) -> FinetuneMLflowTracker:
    """A driver adapter that logs each execution to MLflow.

    :param tracking_uri: where runs go: a directory or `file:` URI (MLflow's file store; the
        default is ./mlruns), `sqlite:///mlflow.db`, `http://host:5000`, `databricks`, ...
    :param experiment_name: the MLflow experiment the runs are grouped in.
    :param options: any other argument of Hamilton's MLFlowTracker (run_name, run_tags, ...).
    """
    tracking_uri = tracking_uri or DEFAULT_TRACKING_DIR
    if _is_file_store(tracking_uri):
        tracking_uri = Path(tracking_uri.removeprefix("file://")).absolute().as_uri()
        # MLflow 3 keeps the file store only for those who opt in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # the adapter also opens the run with mlflow's global API, which reads this
    mlflow.set_tracking_uri(tracking_uri)
    return FinetuneMLflowTracker(
        tracking_uri=tracking_uri, experiment_name=experiment_name, **options
    )
