"""run.py from the shell: help, the DAG picture, a run from a YAML file, exit statuses."""

import argparse
import inspect
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hamilton import driver

import finetune_module
import run
from finetune_module import cli
from finetune_module.engine.loading import TINY_MODEL_HINT
from tests.conftest import EXAMPLE_DATA, REPO, SilentHub, hub_env, read_json


def _cli(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command run in this test's process (`run.main`), as `_cli` runs it in one of its own:
    its exit status and what it printed. For what does not depend on a fresh process (the
    libraries' imports, their warnings and log lines): it spares the ~8 s of starting Python and
    importing torch, transformers and peft that each `_cli` takes on this project's machine."""
    capsys.readouterr()
    try:
        status = run.main(list(args))
    except SystemExit as exit_:  # argparse's --help and usage errors
        status = exit_.code if isinstance(exit_.code, int) else 1
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(["run.py", *args], status, printed.out, printed.err)


def test_help_documents_every_flag_and_lists_the_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # the width argparse wraps to, as in a pipe
    out = _in_process(capsys, "--help")
    assert out.returncode == 0
    parser = cli.build_parser()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:  # the --name-with-dashes spellings
            assert all("-" in flag[2:] for flag in action.option_strings)
            continue
        for flag in action.option_strings:
            assert flag in out.stdout
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    for flag in (
        "--data",
        "--input-key",
        "--output-key",
        "--model_id",
        "--start",
        "--output_dir",
        "--num_train_epochs",
        "--per_device_train_batch_size",
        "--learning_rate",
        "--report_to",
        "--config",
        "--dag",
    ):
        assert flag in out.stdout
    assert out.stdout.startswith(
        "usage: finetune [train|evaluate|predict|export|dag|sweep] [flags]"
    )
    for command, text in cli.COMMANDS.items():
        assert f"  {command:9s} {text}" in out.stdout
    for command in cli.COMMANDS:
        usage = cli.build_parser(command).format_usage()
        assert usage.startswith(f"usage: finetune {command}" if command != "train" else "usage:")


def _dataflow_inputs() -> dict[str, list[Any]]:
    """Each external input of the dataflow over every config, with the functions of the nodes
    that take it (read here from Hamilton and the signatures, not from the command line)."""
    inputs: dict[str, list[Any]] = {}
    for start in finetune_module.STARTS:
        for source in finetune_module.SOURCES:
            dr = finetune_module.build_driver(start, source=source)
            for variable in dr.list_available_variables():
                if variable.is_external_input and variable.originating_functions:
                    users = [
                        function
                        for user in dr.graph.nodes[variable.name].depended_on_by
                        for function in user.originating_functions
                    ]
                    inputs.setdefault(variable.name, []).extend(users)
    return inputs


def test_every_input_of_the_dataflow_has_a_flag_with_its_default_and_docstring() -> None:
    inputs = _dataflow_inputs()
    assert {"data_path", "sql_table", "num_train_epochs", "report_to", "quiet"} <= set(inputs)
    for command in ("train", "evaluate"):
        parser = cli.build_parser(command)
        help_text = " ".join(parser.format_help().split())
        shown = {
            flag: action.dest
            for action in parser._actions
            if action.help != argparse.SUPPRESS
            for flag in action.option_strings
        }
        for name, functions in inputs.items():
            assert shown.get(f"--{name}") == name, f"{command}: no flag --{name} for the input"
            defaults = {
                inspect.signature(f).parameters[name].default
                for f in functions
                if name in inspect.signature(f).parameters
            } - {inspect.Parameter.empty}
            expected = cli.CLI_DEFAULTS.get(name, next(iter(defaults), None))
            assert len(defaults) <= 1, f"{name} has different defaults in different nodes"
            assert parser.get_default(name) == expected, name
            docs = [
                re.search(rf":param {name}:\s*(.{{20}})", inspect.getdoc(f) or "")
                for f in functions
            ]
            starts = [" ".join(m.group(1).split()) for m in docs if m]
            assert starts, f"no node documents the input {name} with a :param: line"
            assert any(start in help_text for start in starts), name
        # a YAML config file takes the same names
        known = {a.dest for a in parser._actions} - {"help", "version", "config"}
        assert set(inputs) <= known


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--activation-memory-gb", "1.5"], {"activation_memory_gb": 1.5}),
        (["--activation_memory_gb", "None"], {"activation_memory_gb": None}),
        (["--activation_memory_gb", "auto"], {"activation_memory_gb": "auto"}),
        (["--cpu-speedups", "auto"], {"cpu_speedups": None}),
        (["--cpu_speedups", "off"], {"cpu_speedups": False}),
        (
            ["--cpu_speedups", "fused_gelu,cheap_dropout"],
            {"cpu_speedups": ["fused_gelu", "cheap_dropout"]},
        ),
        (["--target-modules", "q", "v"], {"target_modules": ["q", "v"]}),
        (["--resume"], {"resume_from_checkpoint": True}),
        (
            ["--resume_from_checkpoint", "ck/checkpoint-4"],
            {"resume_from_checkpoint": "ck/checkpoint-4"},
        ),
        (["--init-adapter-path", "a"], {"init_adapter_path": "a"}),
        (["--no-use_lora"], {"use_lora": False}),
        (["--full-finetune"], {"use_lora": False}),
        (["--trust_remote_code"], {"trust_remote_code": True}),
        (
            ["--training-arg", "warmup_steps=2", "--extra_training_args", "optim=sgd"],
            {"extra_training_args": {"warmup_steps": 2, "optim": "sgd"}},
        ),
        (
            ["--max_source_length", "none", "--num_train_epochs", "3"],
            {"max_source_length": None, "num_train_epochs": 3},
        ),
        (["--learning-rate", "5e-4", "--lora-r", "8"], {"learning_rate": 0.0005, "r": 8}),
        (["--prompt_template", "Q: {input}\\nA:"], {"prompt_template": "Q: {input}\nA:"}),
        (["--report_to", "tensorboard", "wandb"], {"report_to": ["tensorboard", "wandb"]}),
        ([], {}),  # unset: the dataflow's defaults, never the command line's
    ],
)
def test_flags_read_values_of_the_inputs_types(argv: list[str], expected: dict[str, Any]) -> None:
    assert cli.settings_from(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [["--num_beams", "1.5"], ["--seed", "x"], ["--seed"], ["--lora_dropout", "lots"]],
)
def test_a_value_of_the_wrong_type_is_refused_by_the_parser(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.settings_from(argv)
    assert exit_.value.code == 2


def test_version_from_the_command_and_the_module() -> None:
    env = {k: v for k, v in os.environ.items() if k != finetune_module.HAMILTON_AUTOLOAD}
    for command in ([str(REPO / "run.py")], ["-m", "finetune_module"]):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", *command, "--version"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"finetune {finetune_module.__version__} (Python ")
        assert "transformers 5." in out.stdout
        # the command loads none of Hamilton's extensions (its MLflow one imports mlflow)
        imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
        assert "hamilton.driver" in imported and "mlflow" not in imported
        assert "sklearn" not in imported  # the metrics are our own (~0.75 s of a start)


@pytest.mark.parametrize(
    ("orig_argv", "argv0", "command"),
    [
        (["python", "-m", "finetune_module", "--version"], "-m", True),
        (["python", "-X", "importtime", "-m", "finetune_module"], "-m", True),
        (["python", "-m", "their_package"], "-m", False),
        (["python", str(REPO / "run.py")], str(REPO / "run.py"), True),
        (["python", "/elsewhere/run.py"], "/elsewhere/run.py", False),
        (["python", "/venv/bin/finetune", "train"], "/venv/bin/finetune", True),
        (["python", "-c", "import finetune_module"], "-c", False),
        (["python"], "", False),
    ],
)
def test_only_the_commands_own_process_counts_as_the_command(
    orig_argv: list[str], argv0: str, command: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert finetune_module._the_command_runs() is command


def test_a_program_that_imports_the_package_keeps_hamiltons_extensions() -> None:
    # this test process imported the package as a user's program does
    assert finetune_module.HAMILTON_AUTOLOAD not in os.environ
    assert "hamilton.plugins.mlflow_extensions" in sys.modules


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_dag_draws_a_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for start in ("base", "presaved"):
        picture = tmp_path / f"dag-{start}.png"
        out = _in_process(capsys, "--dag", str(picture), "--start", start)
        assert out.returncode == 0, out.stderr
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = _in_process(
        capsys,
        "dag", str(tmp_path / "training.svg"), "--stage", "training", "--model-type", "causal",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "fitted_weights" in (tmp_path / "training.svg").read_text()


# what a run prints with --quiet: the summary, line by line, and nothing else
QUIET_SUMMARY = re.compile(
    r"|Done in [\d.]+ s \(base\)\."
    r"|  stages: \w+ [\d.]+ s(, \w+ [\d.]+ s)*"
    r"|  \w+ +-?[\d.]+(e[+-]\d+)?|nan"
    r"|Hold-out answers \(\d+\):|  [QA]: .*"
    r"|Saved to: .+|Report: .+"
)


def test_config_file_run_with_flag_override_then_presaved(
    tiny_model_dir: Path, tmp_path: Path, silent_hub: SilentHub
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_path": str(EXAMPLE_DATA),
                "model_id": str(tiny_model_dir),
                "output_dir": str(tmp_path / "out"),
                "num_train_epochs": 5,
                "per_device_train_batch_size": 16,
                "extra_training_args": {"warmup_steps": 2},
            }
        )
    )
    out = _cli(
        "--config",
        str(config),
        "--num_train_epochs",
        "1",
        "--training-arg",
        "weight_decay=0.01",
        "--quiet",
        env=hub_env(silent_hub.url, tmp_path / "hf-home"),  # HF_HUB_OFFLINE unset
    )
    assert out.returncode == 0, out.stderr
    assert "rougeL" in out.stdout and f"Saved to: {tmp_path / 'out' / 'best_model'}" in out.stdout
    assert f"Report: {tmp_path / 'out' / 'best_model' / 'report.html'}" in out.stdout
    # --quiet: the summary and nothing else; no progress bars (DAG, training, generation,
    # loading weights), no log lines (trainer, rouge_score, ours), no library warnings
    assert out.stderr == ""
    assert [line for line in out.stdout.splitlines() if not QUIET_SUMMARY.fullmatch(line)] == []
    stages = re.search(r"  stages: (.*)", out.stdout)
    assert stages and [part.split()[0] for part in stages.group(1).split(", ")] == [
        *finetune_module.STAGE_NAMES
    ]  # every stage's wall time, the whole run's, in execution order
    assert not [text for text in ("Loading weights", "%|", "Warning") if text in out.stdout]
    assert silent_hub.requests == []  # a local model directory never touches the network
    state = read_json(
        next((tmp_path / "out" / "checkpoints").glob("checkpoint-*")) / "trainer_state.json"
    )
    assert state["num_train_epochs"] == 1 and state["train_batch_size"] == 16
    out = _cli("--config", str(config), "--start", "presaved")
    assert out.returncode == 0, out.stderr
    assert f"Saved to: {tmp_path / 'out' / 'evaluation'}" in out.stdout
    # without --quiet: a progress bar per generation (the bar over the nodes needs a terminal)
    assert "finetune ->" not in out.stderr
    assert "base model, validation and hold-out sets: 100%|" in out.stderr
    assert "fine-tuned model, validation and hold-out sets: 100%|" in out.stderr


def test_bad_input_exits_2_with_one_line_on_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "a"}]', encoding="utf-8")
    out = _cli("--data", str(bad), "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"error: {bad}: no record has the key 'reply'; keys found: 'question'."
    )
    assert not (tmp_path / "out").exists()


def test_a_query_that_writes_exits_2_with_one_line_and_the_database_is_unchanged(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("sqlalchemy")
    database = tmp_path / "qa.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE qa (id INTEGER PRIMARY KEY, question TEXT, reply TEXT)")
        connection.execute("INSERT INTO qa VALUES (1, 'q', 'r')")
    connection.close()
    before = database.read_bytes()
    url = f"sqlite:///{database}"
    common = ["--source", "sql", "--data", url, "--model-id", str(tiny_model_dir)]
    out = _cli(*common, "--sql-query", "DROP TABLE qa", "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: {url} query 'DROP TABLE qa': the query starts with 'DROP'; sources are "
        "read-only: give one SELECT (or WITH ... SELECT) query."
    )
    out = _cli(*common, "--sql-table", "a.b.c", "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: {url} table 'a.b.c': expected `table` or `schema.table` (to read a name with "
        "a dot in it, give sql_query with the name in double quotes)."
    )
    assert database.read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_exits_2_and_names_the_fix(tmp_path: Path) -> None:
    out = _cli("--data", str(EXAMPLE_DATA), "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2
    assert "Hugging Face Hub" in out.stderr and "--model-id" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_hub_that_does_not_answer_fails_fast_with_one_line(
    silent_hub: SilentHub, tmp_path: Path
) -> None:
    env = hub_env(silent_hub.url, tmp_path / "hf-home")
    began = time.monotonic()
    out = _cli("--data", str(EXAMPLE_DATA), "--output-dir", str(tmp_path / "out"), env=env)
    seconds = time.monotonic() - began
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: Could not load 'google/flan-t5-small': the Hugging Face Hub ({silent_hub.url}) "
        "did not answer within 5 s and it is not in the local cache. "
        f"{TINY_MODEL_HINT}"
    ]
    # the hub was asked once whether it answers (HF_HUB_OFFLINE is not set), never for the model
    assert silent_hub.requests.count("HEAD / HTTP/1.1") == 1
    assert not [request for request in silent_hub.requests if "flan-t5" in request]
    # A timing bound is unusual here, but failing fast is the promise: without the probe the
    # run waits for ever on this endpoint. Generous, for a loaded machine: 5 s are the probe's,
    # up to 3 s huggingface_hub's own telemetry lookup, the rest starting Python and torch.
    assert seconds < 30
    assert not (tmp_path / "out").exists()


def test_hub_log_lines_are_printed_once(failing_hub: str, tmp_path: Path) -> None:
    env = hub_env(failing_hub, tmp_path / "hf-home")
    out = _cli("--data", str(EXAMPLE_DATA), "--output-dir", str(tmp_path / "out"), env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert "HTTP Error 503 thrown while requesting HEAD" in lines[0]  # huggingface_hub's own
    assert sum("[Retry 1/5]" in line for line in lines) == 1
    assert not any(line.startswith("HTTP Request:") for line in lines)  # httpx2, per request
    assert lines[-1].startswith("error: Could not load 'google/flan-t5-small': the Hugging Face")


def test_unknown_config_key_and_missing_data_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data_path: x.json\nepochs: 3\n")
    out = _cli("--config", str(config))
    assert out.returncode == 2 and "Unknown settings in the config file: epochs" in out.stderr
    out = _cli("--model-id", "x")
    assert out.returncode == 2 and "--data" in out.stderr


def test_database_errors_exit_2_and_never_show_the_password(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("psycopg")
    url = "postgresql://finetune:s3cret-pw@127.0.0.1:1/qa"
    # its own output_dir: a failed run in this process holds its directory until the garbage
    # collector frees the run, and the default one (in the cwd) is shared with other tests
    read = ["--source", "sql", "--data", url, "--sql-table", "qa"]
    read += ["--output-dir", str(tmp_path / "out")]
    assert run.main(read) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: postgresql://finetune:***@127.0.0.1:1/qa table 'qa': ")
    assert "cannot connect to the database" in err and "s3cret-pw" not in err
    # --debug: Hamilton logs the failing node's inputs, and the traceback follows; still masked
    out = _cli(*read, "--debug")
    assert out.returncode != 0 and "Node inputs" in out.stderr
    assert "s3cret-pw" not in out.stdout + out.stderr


class _Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_node_progress_bar_on_a_terminal_unless_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.progress_adapters(quiet=True) == []
    adapters = cli.progress_adapters(quiet=False)
    assert [type(a).__name__ for a in adapters] == ["ProgressBar"]
    dr = (
        driver.Builder()
        .with_config({"start": "base"})
        .with_modules(*finetune_module.MODULES)
        .with_adapters(*adapters)
        .build()
    )
    inputs = {"data_path": str(EXAMPLE_DATA), "input_text_key": "question"}
    dr.execute(["qa_table"], inputs={**inputs, "output_text_key": "reply"})
    shown = terminal.getvalue()
    assert "finetune -> raw_records" in shown  # the node being computed
    assert re.search(r"finetune -> Execution Complete!: 100%\|#+\| (\d+)/\1 ", shown)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert cli.progress_adapters(quiet=False) == []
