"""Tracking in the Hamilton UI (optional): each run's dataflow, inputs, node runs and results,
seen in Hamilton's own web UI.

Built on the Hamilton SDK's tracker (`hamilton_sdk.adapters.HamiltonTracker`): it registers the
dataflow (its nodes and code) as a DAG version of a project, then records each `dr.execute(...)`
as a run with its inputs, tags and every node's status, timing and a summary of its result. The
tracker here tags each run with its start, source, model and this package's version, masks URL
passwords in everything it sends, sends each node's record as the node ends (a run's record is
complete when `execute` returns), and keeps training when the server stops answering mid-run.

```python
from finetune_module.ui_tracking import hamilton_ui_tracker

tracker = hamilton_ui_tracker(project_id=1, username="me@example.com")  # localhost:8241
dr = finetune_module.build_driver("base", adapters=[tracker])
```
Needs the optional package apache-hamilton-sdk (`pip install "finetune-module[ui]"`) and a
running Hamilton UI (`pip install apache-hamilton-ui && hamilton ui`) holding the project.
"""

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import finetune_module
from finetune_module.engine import run_info
from finetune_module.engine.loading import DEFAULT_MODEL_ID
from finetune_module.errors import SettingsError, import_optional, mask_credentials

adapters = import_optional("hamilton_sdk.adapters", "Tracking in the Hamilton UI")
clients = import_optional("hamilton_sdk.api.clients", "Tracking in the Hamilton UI")
sdk_utils = import_optional("hamilton_sdk.tracking.utils", "Tracking in the Hamilton UI")
requests = import_optional("requests", "Tracking in the Hamilton UI")

logger = logging.getLogger(__name__)

#: Where `hamilton ui` serves its API and its pages, unless HAMILTON_API_URL says otherwise.
DEFAULT_UI_URL = "http://localhost:8241"
#: The name the dataflow is registered under in the project.
DEFAULT_DAG_NAME = "finetune"
#: How long the server may take to answer the first request before the run is refused.
PROBE_TIMEOUT_S = 5.0
#: Longer texts among the results sent (the HTML report) are cut to this many characters.
MAX_TEXT_LENGTH = 10_000

_UNREACHABLE_HELP = (
    "start it with `hamilton ui` (pip install apache-hamilton-ui) or give its address "
    "(--hamilton-ui-url, or api_url)"
)


def _masked(value: Any) -> Any:
    """A JSON-like value with the password of every URL in its texts masked and long texts cut
    to MAX_TEXT_LENGTH characters."""
    if isinstance(value, str):
        if len(value) > MAX_TEXT_LENGTH:
            value = f"{value[:MAX_TEXT_LENGTH]}... ({len(value)} characters)"
        return mask_credentials(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return value


class MaskingClient(clients.BasicSynchronousHamiltonClient):
    """The SDK's HTTP client, masking URL passwords in the inputs, tags, config and results it
    sends, and sending each node's update at once (not in batches from a background thread)."""

    def register_dag_template_if_not_exists(
        self, *, config: dict[str, Any], tags: dict[str, str], **kwargs: Any
    ) -> int:
        """Registers the dataflow (a DAG version) in the project; its id."""
        config = _masked(sdk_utils.make_json_safe(config))
        return super().register_dag_template_if_not_exists(
            config=config, tags=_masked(tags), **kwargs
        )

    def create_and_start_dag_run(
        self, *, dag_template_id: int, tags: dict[str, str], inputs: dict[str, Any], **kwargs: Any
    ) -> int:
        """Opens a run of the registered dataflow; its id."""
        inputs = _masked(sdk_utils.make_json_safe(inputs))
        return super().create_and_start_dag_run(
            dag_template_id=dag_template_id, tags=_masked(tags), inputs=inputs, **kwargs
        )

    def update_tasks(
        self,
        dag_run_id: int,
        attributes: list[dict[str, Any] | None],
        task_updates: list[dict[str, Any]],
        in_samples: list[bool] | None = None,
    ) -> None:
        """Sends a node's start or end (status, times, result summary) now."""
        sampled = in_samples or [True] * len(task_updates)
        kept = [(a, t) for a, t, s in zip(attributes, task_updates, sampled, strict=True) if s]
        if kept:
            update = {
                "dag_run_id": dag_run_id,
                "attributes": [_masked(attribute) for attribute, _ in kept],
                "task_updates": [task for _, task in kept],
            }
            self.flush([update])


class FinetuneHamiltonTracker(adapters.HamiltonTracker):
    """The Hamilton SDK's tracker for this dataflow: runs tagged with their start, source, model
    and the package's version; a server that stops answering mid-run costs one warning, and the
    run goes on untracked."""

    def __init__(self, **options: Any) -> None:
        """Connects to the server (the SDK's options: project_id, username, dag_name, tags,
        api_key, hamilton_api_url, hamilton_ui_url)."""
        super().__init__(client_factory=MaskingClient, **options)
        self.user_tags = dict(self.base_tags)
        self.lost = False

    def _guarded(self, hook: Callable[..., Any], **kwargs: Any) -> Any:
        """Runs one of the SDK's hooks unless the server was lost; losing it is warned once."""
        if self.lost:
            return None
        try:
            with _sdk_logs_hidden("hamilton_sdk.api"):  # its traceback of a failed request
                return hook(**kwargs)
        except (requests.RequestException, clients.ResourceDoesNotExistException) as e:
            self.lost = True
            reason = mask_credentials(" ".join(str(e).split()))[:300]
            logger.warning(
                "The Hamilton UI stopped answering (%s); this run goes on without tracking.",
                reason,
            )
            return None

    def _tags(self, config: dict[str, Any], inputs: dict[str, Any] | None = None) -> None:
        """Sets the tags sent next: the start, source, model and version, what the run is part
        of (a sweep's `sweep` and `trial`), and the user's (which win over those)."""
        tags = {
            "start": str(config.get("start", "base")),
            "source": str(config.get("source", "file")),
            "finetune_module": finetune_module.__version__,
        }
        if inputs is not None:
            if tags["start"] == "base":
                tags["model_id"] = str(inputs.get("model_id") or DEFAULT_MODEL_ID)
            if inputs.get("presaved_model_path"):
                tags["presaved_model_path"] = str(inputs["presaved_model_path"])
            tags.update(run_info.run_labels())  # a sweep's study and trial
        self.base_tags = {**tags, **self.user_tags}

    def post_graph_construct(self, *, graph: Any, **kwargs: Any) -> None:
        """Registers the dataflow, tagged with its start and source (without the SDK's notes
        on how it versions the code: outside a git checkout, modules loaded lazily)."""
        self._tags(graph.config)
        with _sdk_logs_hidden("hamilton_sdk.driver"):
            self._guarded(super().post_graph_construct, graph=graph, **kwargs)

    def pre_graph_execute(self, *, graph: Any, inputs: dict[str, Any], **kwargs: Any) -> Any:
        """Opens the run (tagged with its model too); a dataflow the server never registered
        runs untracked."""
        self.lost = id(graph) not in self.dag_template_id_cache
        self._tags(graph.config, inputs or {})
        return self._guarded(super().pre_graph_execute, graph=graph, inputs=inputs, **kwargs)

    def pre_node_execute(self, **kwargs: Any) -> None:
        """Records a node's start."""
        self._guarded(super().pre_node_execute, **kwargs)

    def post_node_execute(self, **kwargs: Any) -> None:
        """Records a node's end: its status, time and a summary of its result (without the
        warnings of the libraries the SDK summarizes tables with, about its own calls)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="hamilton_sdk")
            self._guarded(super().post_node_execute, **kwargs)

    def post_graph_execute(self, **kwargs: Any) -> None:
        """Closes the run with its status."""
        self._guarded(super().post_graph_execute, **kwargs)


@contextlib.contextmanager
def _sdk_logs_hidden(name: str = "hamilton_sdk") -> Iterator[None]:
    """Hides the SDK's own log lines (and tracebacks) of logger `name` for a while: a refusal
    is explained in one line instead."""
    sdk = logging.getLogger(name)
    level = sdk.level
    sdk.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        sdk.setLevel(level)


def check_server(api_url: str, username: str, api_key: str | None = None) -> None:
    """Refuses, in one line, a Hamilton UI that does not answer within PROBE_TIMEOUT_S or that
    refuses the user (the SDK's own requests would wait for ever)."""
    try:
        response = requests.get(
            f"{api_url}/api/v1/phone_home",
            headers={"x-api-user": username, "x-api-key": api_key},
            timeout=PROBE_TIMEOUT_S,
        )
    except requests.Timeout as e:
        raise SettingsError(
            f"The Hamilton UI at {api_url} did not answer within {PROBE_TIMEOUT_S:g} s: "
            f"{_UNREACHABLE_HELP}."
        ) from e
    except requests.RequestException as e:
        raise SettingsError(
            f"The Hamilton UI at {api_url} cannot be reached ({type(e).__name__}): "
            f"{_UNREACHABLE_HELP}."
        ) from e
    if response.status_code // 100 == 4:
        raise SettingsError(
            f"The Hamilton UI at {api_url} refused user {username!r} "
            f"(HTTP {response.status_code}): check the username and API key."
        )


def hamilton_ui_tracker(
    project_id: int,
    username: str,
    dag_name: str = DEFAULT_DAG_NAME,
    tags: dict[str, Any] | None = None,
    api_url: str | None = None,
    ui_url: str | None = None,
    api_key: str | None = None,
) -> FinetuneHamiltonTracker:
    """A driver adapter that records each execution in the Hamilton UI.

    :param project_id: the id of the project the runs go to; create the project in the UI
        first (its Projects page shows the id).
    :param username: who the runs are recorded as: the name (an email) you log in to the UI
        with; the project must be visible to this user.
    :param dag_name: the name the dataflow is listed under in the project.
    :param tags: tags of every run (values as text), added to the automatic ones (start, source,
        model_id or presaved_model_path, finetune_module's version).
    :param api_url: the server's address (default: HAMILTON_API_URL, else
        http://localhost:8241, where `hamilton ui` serves).
    :param ui_url: the address of its pages in the links logged (default: HAMILTON_UI_URL,
        else api_url).
    :param api_key: the API key of a deployed server (default: HAMILTON_API_KEY; the local UI
        needs none).
    """
    api_url = (api_url or os.environ.get("HAMILTON_API_URL") or DEFAULT_UI_URL).rstrip("/")
    ui_url = (ui_url or os.environ.get("HAMILTON_UI_URL") or api_url).rstrip("/")
    api_key = api_key or os.environ.get("HAMILTON_API_KEY")
    tags = {str(key): mask_credentials(str(value)) for key, value in (tags or {}).items()}
    check_server(api_url, username, api_key)
    try:
        with _sdk_logs_hidden():
            return FinetuneHamiltonTracker(
                project_id=project_id,
                username=username,
                dag_name=dag_name,
                tags=tags,
                api_key=api_key,
                hamilton_api_url=api_url,
                hamilton_ui_url=ui_url,
            )
    except (clients.ResourceDoesNotExistException, clients.UnauthorizedException) as e:
        raise SettingsError(
            f"The Hamilton UI at {api_url} has no project {project_id} visible to user "
            f"{username!r}: create it at {ui_url}/dashboard/projects (logged in as that user) "
            "and give its id."
        ) from e
    except requests.RequestException as e:
        raise SettingsError(
            f"The Hamilton UI at {api_url} failed ({type(e).__name__}): {_UNREACHABLE_HELP}."
        ) from e
