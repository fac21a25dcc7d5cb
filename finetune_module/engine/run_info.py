"""What ran: the facts a run's report and `run_info.json` state about the run, gathered by plain
functions (no Hamilton): a fingerprint of the data, the settings that differ from their
defaults, the library versions and the device, and a clock of each stage's wall time.

- `records_fingerprint(inputs, outputs, splits)`: sha256 over the texts actually read, in order.
- `differing_settings(function, values)`: each value that differs from the default of the
  function's parameter of the same name (credentials masked).
- `library_versions()`, `device_description(device)`: what the run ran on.
- `StageClock`: when the run started and the wall time of each stage's nodes, as they finish
  (`finetune_module.timing.StageTimer` feeds it from Hamilton's node hooks).
- `labelled_run(**labels)`, `run_labels()`: what a run is part of (a sweep's study and trial),
  stated in its report and sent as tags to the Hamilton UI.
"""

import contextlib
import contextvars
import dataclasses
import datetime
import hashlib
import inspect
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

import torch

from finetune_module.errors import mask_credentials

#: The libraries whose versions a run records (distribution names).
LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "accelerate")

#: What `records_fingerprint` covers, in words (stated next to it in the report and JSON).
FINGERPRINT_COVERS = (
    "sha256 of the input and output texts of every record read, in the order read (and each "
    "record's split when split_column is named); contexts (context_key) are not covered"
)


def records_fingerprint(
    inputs: Iterable[str], outputs: Iterable[str], splits: Iterable[str] | None = None
) -> str:
    """A stable fingerprint of the records: the sha256 (hex) of each record's input and output
    text (and split, when given), in order, each text length-prefixed so that no two different
    tables hash alike by moving text from one field to the next. The same records in the same
    order give the same fingerprint, on any machine and whatever file format they came in."""
    digest = hashlib.sha256()
    columns = [inputs, outputs] if splits is None else [inputs, outputs, splits]
    for texts in zip(*columns, strict=True):
        for text in texts:
            encoded = str(text).encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()


def plain_value(value: Any) -> Any:
    """A setting's value as JSON-ready data: numbers, booleans and None as they are, texts with
    URL passwords masked, lists and mappings item by item, anything else as masked text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, list | tuple):
        return [plain_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain_value(item) for key, item in value.items()}
    return mask_credentials(str(value))


def differing_settings(
    function: Callable[..., Any], values: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The values that differ from the default of `function`'s parameter of the same name (a
    parameter without a default always differs), in the order given: name -> {"value",
    "default"}, as JSON-ready data with credentials masked. A value equal to its default
    (2 for 2.0) is left out, whether it was given or not."""
    parameters = inspect.signature(function).parameters
    differing = {}
    for name, value in values.items():
        default = parameters[name].default
        if default is inspect.Parameter.empty or _differs(value, default):
            shown = None if default is inspect.Parameter.empty else plain_value(default)
            differing[name] = {"value": plain_value(value), "default": shown}
    return differing


def _differs(value: Any, default: Any) -> bool:
    """Whether a value differs from a default (by type where equality would mix them up: True
    is not 1)."""
    if isinstance(value, bool) != isinstance(default, bool):
        return True
    try:
        return bool(value != default)
    except (TypeError, ValueError):  # values that do not compare (arrays)
        return True


def library_versions() -> dict[str, str]:
    """Python's version and those of the libraries in `LIBRARIES` that are installed."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_description(device: torch.device) -> dict[str, Any]:
    """Where the model ran: the device, its name for a GPU, and the CPU threads torch uses."""
    described: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def now_iso() -> str:
    """The current time in ISO 8601 with the local time zone (seconds)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclasses.dataclass
class StageClock:
    """When a run started, and the wall time of each stage: the sum of its nodes' times (the
    nodes of a run execute one after another), recorded as each node finishes."""

    started_at: str = dataclasses.field(default_factory=now_iso)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    _began: dict[str, float] = dataclasses.field(default_factory=dict, repr=False)
    _start: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def node_started(self, node: str) -> None:
        """A node began executing (or being taken from the cache)."""
        self._began[node] = time.perf_counter()

    def node_finished(self, node: str, stage: str) -> None:
        """A node of `stage` finished: its time is added to the stage's."""
        began = self._began.pop(node, None)
        if began is not None:
            seconds = time.perf_counter() - began
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def so_far(self) -> dict[str, Any]:
        """The readings now: `started_at` (ISO 8601 with time zone), `stage_seconds` (stage ->
        seconds of its nodes finished so far, in the order the stages first finished a node)
        and `elapsed_seconds` since the start."""
        return {
            "started_at": self.started_at,
            "stage_seconds": dict(self.stage_seconds),
            "elapsed_seconds": time.perf_counter() - self._start,
        }


_LABELS: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "run_labels", default=()
)


@contextlib.contextmanager
def labelled_run(**labels: Any) -> Iterator[None]:
    """Labels the runs inside the `with` block (e.g. a sweep's `sweep` and `trial`): their
    reports state them and the Hamilton UI tracker tags them with them. The labels are this
    context's own (a `contextvars` variable), as the runs of the default driver are."""
    merged = {**dict(_LABELS.get()), **{str(k): str(v) for k, v in labels.items()}}
    token = _LABELS.set(tuple(merged.items()))
    try:
        yield
    finally:
        _LABELS.reset(token)


def run_labels() -> dict[str, str]:
    """The labels of the run in progress (`labelled_run`): empty for a plain run."""
    return dict(_LABELS.get())
