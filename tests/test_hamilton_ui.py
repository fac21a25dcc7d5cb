"""Tracking in the Hamilton UI (--hamilton-ui, finetune_module.ui_tracking): a tiny run read back
from a real Hamilton UI server (CI starts one, .ci/hamilton-ui.sh, and names it in
FINETUNE_TEST_HAMILTON_UI_URL); the flags; what is sent (passwords masked) to a stand-in of its
API; and a server that is not there, or stops answering."""

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hamilton import ad_hoc_utils, driver

from finetune_module import cli
from tests.conftest import EXAMPLE_DATA, QUICK, SilentHub

pytest.importorskip("hamilton_sdk", reason="apache-hamilton-sdk is an optional extra ([ui])")

import requests

import finetune_module
from finetune_module.errors import SettingsError
from finetune_module.ui_tracking import PROBE_TIMEOUT_S, hamilton_ui_tracker

UI_URL = os.environ.get("FINETUNE_TEST_HAMILTON_UI_URL")
needs_server = pytest.mark.skipif(
    not UI_URL,
    reason="no Hamilton UI server: FINETUNE_TEST_HAMILTON_UI_URL is unset "
    "(.ci/run starts one with .ci/hamilton-ui.sh)",
)
USER = "finetune-tests@example.com"
PASSWORD_URL = "postgresql://me:hunter2@db/qa"


def _api(path: str, *, method: str = "GET", **query: Any) -> Any:
    """The answer of the Hamilton UI server's API to one request as `USER`: a GET with `query`
    as its parameters, or a POST with `query` as its JSON body."""
    response = requests.request(
        method,
        f"{UI_URL}/api/v1/{path}",
        headers={"x-api-user": USER},
        params=query if method == "GET" else None,
        json=query if method != "GET" else None,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def _new_project() -> int:
    """A new project on the server, writable by `USER` (as the UI's Projects page makes one)."""
    visibility = {
        "user_ids_visible": [],
        "user_ids_writable": [USER],
        "team_ids_visible": [],
        "team_ids_writable": [],
    }
    name = f"finetune-tests-{time.time_ns()}"
    created = _api(
        "projects", method="POST", name=name, description="tests", tags={}, visibility=visibility
    )
    return int(created["id"])


@pytest.fixture(scope="module")
def project_id() -> int:
    """A project of this module's own."""
    return _new_project()


@needs_server
def test_a_run_and_its_nodes_are_read_back_from_the_server(
    tiny_model_dir: Path, tmp_path: Path, project_id: int
) -> None:
    argv = [
        "--data", str(EXAMPLE_DATA), "--model-id", str(tiny_model_dir), "--quiet",
        "--output-dir", str(tmp_path / "out"), "--max_steps", str(QUICK["max_steps"]),
        "--max-new-tokens", str(QUICK["max_new_tokens"]),
        "--hamilton-ui", str(project_id), "--hamilton-ui-url", str(UI_URL),
        "--hamilton-ui-username", USER, "--hamilton-ui-dag-name", "finetune-test",
        "--hamilton-ui-tag", "suite=ci", "--hamilton-ui-tag", f"database={PASSWORD_URL}",
    ]  # fmt: skip
    assert cli.main(argv) == 0

    assert _api(f"projects/{project_id}")["id"] == project_id
    (template,) = _api("dag_templates/latest/", project_id=project_id)
    assert template["name"] == "finetune-test"
    assert template["config"] == {"start": "base", "source": "file"}
    (run,) = _api("dag_runs/latest/", project_id=project_id)
    assert run["run_status"] == "SUCCESS" and run["dag_template_id"] == template["id"]
    assert run["tags"] == {
        "start": "base",
        "source": "file",
        "finetune_module": finetune_module.__version__,
        "model_id": str(tiny_model_dir),
        "suite": "ci",
        "database": "postgresql://me:***@db/qa",
    }
    assert run["inputs"]["data_path"] == str(EXAMPLE_DATA)
    assert set(run["outputs"]) == set(finetune_module.DEFAULT_OUTPUTS)
    (details,) = _api(f"dag_runs/{run['id']}")
    statuses = {node["node_name"]: node["status"] for node in details["node_runs"]}
    for name in ("qa_table", "tokenized_train", "fitted_weights", "save_best_models"):
        assert statuses[name] == "SUCCESS", name
    assert set(statuses.values()) == {"SUCCESS"}


@needs_server
def test_a_sweeps_runs_are_tracked_each_tagged_with_its_trial(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("optuna", reason="optuna is an optional extra ([sweep])")
    project = _new_project()
    argv = [
        "sweep", "--data", str(EXAMPLE_DATA), "--model-id", str(tiny_model_dir), "--quiet",
        "--output-dir", str(tmp_path / "sweep"), "--max_steps", str(QUICK["max_steps"]),
        "--max-new-tokens", str(QUICK["max_new_tokens"]), "--n-trials", "2",
        "--search-space", "{learning_rate: [0.001, 0.005]}", "--study-name", "tracked",
        "--hamilton-ui", str(project), "--hamilton-ui-url", str(UI_URL),
        "--hamilton-ui-username", USER,
    ]  # fmt: skip
    assert cli.main(argv) == 0

    runs = _api("dag_runs/latest/", project_id=project)
    assert {run["run_status"] for run in runs} == {"SUCCESS"}
    # the data and tokenization, run once, then each trial's fine-tune, tagged with its trial
    trials = sorted(run["tags"].get("trial", "") for run in runs)
    assert trials == ["", "0", "1"]
    for run in runs:
        if run["tags"].get("trial"):
            assert run["tags"]["sweep"] == "tracked"
            assert run["inputs"]["learning_rate"] in (0.001, 0.005)
            (details,) = _api(f"dag_runs/{run['id']}")
            statuses = {node["node_name"]: node["status"] for node in details["node_runs"]}
            assert statuses["fitted_weights"] == statuses["save_best_models"] == "SUCCESS"


@needs_server
def test_a_project_that_does_not_exist_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--data", str(EXAMPLE_DATA), "--output-dir", str(tmp_path / "out"),
        "--hamilton-ui", "999999", "--hamilton-ui-url", str(UI_URL),
        "--hamilton-ui-username", USER,
    ]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: The Hamilton UI at {UI_URL} has no project 999999 visible to")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- without a server -----------------------------------------------------------------------


def _closed_port_url() -> str:
    """The address of a port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _ui_argv(url: str, out: Path) -> list[str]:
    """A run's flags with tracking in the Hamilton UI at `url`."""
    return [
        "--data", str(EXAMPLE_DATA), "--output-dir", str(out),
        "--hamilton-ui", "1", "--hamilton-ui-url", url, "--hamilton-ui-username", USER,
    ]  # fmt: skip


def test_a_server_that_is_not_there_stops_the_run_at_once_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _closed_port_url()
    began = time.monotonic()
    assert cli.main(_ui_argv(url, tmp_path / "out")) == 2
    assert time.monotonic() - began < 10
    assert capsys.readouterr().err.splitlines() == [
        f"error: The Hamilton UI at {url} cannot be reached (ConnectionError): start it with "
        "`hamilton ui` (pip install apache-hamilton-ui) or give its address (--hamilton-ui-url, "
        "or api_url)."
    ]
    assert not (tmp_path / "out").exists()


def test_a_server_that_never_answers_is_given_up_after_the_probe(
    silent_hub: SilentHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    assert cli.main(_ui_argv(silent_hub.url, tmp_path / "out")) == 2
    assert time.monotonic() - began < PROBE_TIMEOUT_S + 10  # the SDK alone would wait for ever
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: The Hamilton UI at {silent_hub.url} did not answer within 5 s")
    assert not (tmp_path / "out").exists()


def test_the_flags_build_the_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(
        "finetune_module.ui_tracking.hamilton_ui_tracker",
        lambda *args, **kwargs: built.append((args, kwargs)) or "tracker",
    )
    argv = [
        "--hamilton-ui", "4", "--hamilton-ui-username", USER, "--hamilton-ui-url", "http://ui:9",
        "--hamilton-ui-dag-name", "qa", "--hamilton-ui-tag", "team=support",
        "--hamilton-ui-tag", "round=2",
    ]  # fmt: skip
    settings = cli.settings_from(argv)
    flags = {name: settings.pop(name) for name in cli.CLI_ONLY if name in settings}
    assert settings == {}  # none of them is an input of the dataflow
    assert cli._adapters(flags) == ["tracker"]
    assert built == [
        (
            (4, USER),
            {"dag_name": "qa", "tags": {"team": "support", "round": 2}, "api_url": "http://ui:9"},
        )
    ]
    with pytest.raises(SettingsError, match="--hamilton-ui needs --hamilton-ui-username"):
        cli._adapters({"hamilton_ui": 4})


# --- a stand-in for the server's API: what the tracker sends ----------------------------------


class _StandIn(BaseHTTPRequestHandler):
    """Answers the API calls the tracker makes (ids 7, no existing DAG version) and keeps each
    request (method, path, JSON body) in the server's `requests`; fails the node updates with
    503 while the server's `failing` is set."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.command, self.path, body))  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        status, answer = 200, {}
        if path.startswith("/api/v1/dag_runs_bulk") and self.server.failing:  # type: ignore[attr-defined]
            status = 503
        elif path.startswith("/api/v1/dag_templates/exists"):
            answer = None
        elif self.command == "POST":
            answer = {"id": 7}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[Any]:
    """A stand-in for the Hamilton UI's API: `url`, `requests`, `failing`."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    server.requests, server.failing = [], False
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def database_url(url: str) -> str:
    """The input, as a node's result."""
    return url


def long_text(database_url: str) -> str:
    """A text longer than what is sent."""
    return database_url + "x" * 50_000


def _toy_driver(tracker: Any) -> driver.Driver:
    """A driver of two nodes with the tracker attached."""
    toy = ad_hoc_utils.create_temporary_module(database_url, long_text)
    return driver.Builder().with_modules(toy).with_adapters(tracker).build()


def test_passwords_are_masked_in_the_inputs_tags_and_results_sent(stand_in: Any) -> None:
    tracker = hamilton_ui_tracker(1, USER, api_url=stand_in.url, tags={"db": PASSWORD_URL})
    result = _toy_driver(tracker).execute(["long_text"], inputs={"url": PASSWORD_URL})
    assert result["long_text"].startswith(PASSWORD_URL)
    sent = json.dumps([body for _, _, body in stand_in.requests])
    assert "hunter2" not in sent and "postgresql://me:***@db/qa" in sent
    (run,) = [
        body for method, path, body in stand_in.requests if path.startswith("/api/v1/dag_runs?")
    ]
    assert run["inputs"] == {"url": "postgresql://me:***@db/qa"}
    assert run["tags"]["db"] == "postgresql://me:***@db/qa" and run["tags"]["start"] == "base"
    # each node's start and end is sent as it happens; a long text is cut
    updates = [body for method, path, body in stand_in.requests if "dag_runs_bulk" in path]
    assert len(updates) == 4
    assert max(len(json.dumps(update)) for update in updates) < 12_000


def test_a_server_lost_mid_run_costs_one_warning_not_the_run(
    stand_in: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = hamilton_ui_tracker(1, USER, api_url=stand_in.url)
    stand_in.failing = True
    with caplog.at_level(logging.WARNING):
        result = _toy_driver(tracker).execute(["long_text"], inputs={"url": "sqlite://"})
    assert result["long_text"].startswith("sqlite://")
    lost = [r for r in caplog.records if "stopped answering" in r.getMessage()]
    assert len(lost) == 1
    assert sum("dag_runs_bulk" in path for _, path, _ in stand_in.requests) == 1
