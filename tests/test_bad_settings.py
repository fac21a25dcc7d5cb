"""Bad settings: one clear error before anything is written, and exit status 2 from the CLI."""

import json
from pathlib import Path
from typing import Any

import pytest

import finetune_module
import run
from finetune_module.errors import FinetuneInputError, ModelNotAvailableError, SettingsError
from tests.conftest import EXAMPLE_DATA, run_dag

# (setting, the start of the message it gets); every one is refused before training starts
BAD_SETTINGS = [
    ({"data_path": "no-such.json"}, "no-such.json: no such file."),
    ({"train_size": 1.5}, "train_size must be between 0 and 1 (exclusive), got 1.5."),
    ({"validation_size": 0}, "validation_size must be between 0 and 1 (exclusive), got 0."),
    ({"random_state": -1}, "random_state must be 0 or more, got -1."),
    ({"split_strategy": "first"}, "split_strategy must be one of random, last; got 'first'."),
    ({"input_text_key": "reply"}, "input_text_key and output_text_key are both 'reply'"),
    ({"max_source_length": 1}, "max_source_length must be at least 2 tokens, got 1."),
    ({"length_percentile": 0}, "length_percentile must be in (0, 100], got 0."),
    ({"model_id": "./no-such-model"}, "Model directory './no-such-model' does not exist."),
    ({"seed": -1}, "seed must be 0 or more, got -1."),
    ({"r": 0}, "r (the LoRA rank) must be at least 1, got 0."),
    ({"lora_dropout": 1}, "lora_dropout must be in [0, 1), got 1."),
    (
        {"target_modules": ["q", "nope"]},
        "target_modules: the model has no linear layer named nope; its linear layers are k,",
    ),
    ({"init_adapter_path": "nowhere"}, "init_adapter_path: no saved adapter in"),
    ({"num_beams": 0}, "num_beams must be at least 1, got 0."),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0."),
    ({"generation_batch_size": 0}, "generation_batch_size must be at least 1, got 0."),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a positive"),
    ({"per_device_eval_batch_size": -8}, "per_device_eval_batch_size must be a positive"),
    ({"num_train_epochs": 0}, "num_train_epochs must be a positive number, got 0."),
    ({"learning_rate": 0}, "learning_rate must be a positive number, got 0."),
    ({"resume_from_checkpoint": "nowhere"}, "resume_from_checkpoint: '"),
    ({"activation_memory_gb": 0}, "activation_memory_gb must be a positive number of GB, None"),
    (
        {"extra_training_args": {"eval_strategy": "sometimes"}},
        "Invalid training arguments: sometimes is not a valid IntervalStrategy",
    ),
]


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS, ids=lambda v: str(v)[:40])
def test_bad_setting_is_refused_before_anything_is_written(
    tiny_model_dir: Path, tmp_path: Path, setting: dict[str, Any], message: str
) -> None:
    output_dir = tmp_path / "out"
    inputs = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(tiny_model_dir),
        "output_dir": str(output_dir),
        **setting,
    }
    with pytest.raises(FinetuneInputError) as error:
        run_dag("base", **inputs)
    assert str(error.value).startswith(message)
    assert not output_dir.exists()


def test_output_dir_that_is_a_file_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.write_text("")
    with pytest.raises(SettingsError, match="is a file; it must be a directory"):
        run_dag(
            "base",
            data_path=str(EXAMPLE_DATA),
            model_id=str(tiny_model_dir),
            output_dir=str(output_dir),
        )


def test_presaved_checks_its_settings_and_writes_nothing(
    base_run: dict[str, Any], tmp_path: Path
) -> None:
    inputs = {
        "data_path": str(EXAMPLE_DATA),
        "presaved_model_path": str(base_run["result"]["save_best_models"]),
        "output_dir": str(tmp_path / "out"),
    }
    with pytest.raises(SettingsError, match="per_device_eval_batch_size must be a positive"):
        run_dag("presaved", **inputs, per_device_eval_batch_size=0)
    with pytest.raises(SettingsError, match="num_beams must be at least 1, got 0"):
        run_dag("presaved", **inputs, num_beams=0)
    with pytest.raises(ModelNotAvailableError, match=r"presaved_model_path .* holds no"):
        run_dag("presaved", **{**inputs, "presaved_model_path": str(tmp_path)})
    assert not (tmp_path / "out").exists()


def test_unknown_start_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="start must be one of base, presaved; got 'bse'"):
        finetune_module.build_driver("bse")
    presaved = finetune_module.build_driver("presaved")
    variables = {v.name for v in presaved.list_available_variables()}
    assert "save_best_models" in variables and "fitted_weights" not in variables


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """run.py's main, in this process; its exit status and the last line of its stderr."""
    status = run.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()[-1]


def test_cli_bad_inputs_exit_2_with_the_message(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    model = ["--model-id", str(tiny_model_dir), "--output-dir", str(out)]
    data = ["--data", str(EXAMPLE_DATA)]
    truncated = _write(tmp_path / "t.json", json.dumps([{"question": "q", "reply": "a"}])[:-2])
    cases = [
        (["--data", str(tmp_path / "none.json"), *model], f"{tmp_path / 'none.json'}: no such"),
        (["--data", truncated, *model], f"error: {truncated}: invalid JSON: the file ends"),
        (["--config", str(tmp_path / "none.yaml")], "cannot be read (No such file or directory)"),
        (["--config", _write(tmp_path / "a.yaml", "a: [1\n")], "a.yaml: not valid YAML"),
        (["--config", _write(tmp_path / "l.yaml", "- 1\n")], "must hold a mapping"),
        (
            ["--config", _write(tmp_path / "s.yaml", "start: bse\n"), *data],
            "start must be one of base, presaved; got 'bse'.",
        ),
        (
            ["--config", _write(tmp_path / "n.yaml", "learning_rate: 1e-3\nseed: one\n"), *data],
            "error: learning_rate must be float | int, got '1e-3' (YAML reads numbers like 1e-3 "
            "as text: write 0.001 or 1.0e-3); seed must be int, got 'one'.",
        ),
        ([*data, *model, "--train-size", "1"], "train_size must be between 0 and 1"),
        ([*data, *model, "--num_train_epochs", "0"], "num_train_epochs must be a positive"),
        ([*data, *model, "--resume", str(tmp_path)], "is not a complete Trainer checkpoint"),
        (
            [*data, "--model-id", "./no-such-model", "--output-dir", str(out)],
            "Model directory './no-such-model' does not",
        ),
    ]
    for args, message in cases:
        status, last_line = _cli(args, capsys)
        assert (status, message in last_line) == (2, True), (args, last_line)
        assert last_line.startswith("error: ")
    assert not out.exists()


def test_cli_flag_errors_and_other_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (["--start", "bse"], ["--per_device_train_batch_size", "x"], ["--seed"]):
        with pytest.raises(SystemExit) as exit_:
            run.main(args)
        assert exit_.value.code == 2
        assert "error: argument" in capsys.readouterr().err
    # a failure that is not the user's input (here: the picture cannot be written) is status 1
    status, last_line = _cli(["--dag", "/proc/no-such-dir/dag.png"], capsys)
    assert status == 1 and "(run with --debug for the traceback)" in last_line
    with pytest.raises(SettingsError):  # --debug lets the exception through, traceback and all
        run.main(["--debug", "--config", _write(tmp_path / "l.yaml", "- 1\n")])
