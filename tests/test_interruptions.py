"""Killed runs: atomic artifacts, resuming from checkpoints, continuing a saved adapter.

The kill tests run run.py in a subprocess (tests/pausing_run.py pauses it at the moment to kill)
and send it a real signal.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from finetune_module import build_driver
from finetune_module.engine.files import LOCK_FILE, atomic_directory
from finetune_module.engine.models import ModelRecipe, build_model
from finetune_module.engine.settings import ModelSettings, TrainingSettings
from finetune_module.errors import SettingsError
from finetune_module.model import presaved_model_dir
from finetune_module.training import training_arguments
from tests.conftest import EXAMPLE_DATA, REPO, read_json, run_dag


def _paused_run(pause_at: str, marker: Path, *args: str) -> subprocess.Popen[str]:
    """run.py with `args`, paused at `pause_at` (see tests/pausing_run.py) once `marker` exists."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "pausing_run.py"), pause_at, str(marker), *args],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(marker: Path, process: subprocess.Popen[str], timeout: float = 500) -> None:
    """Waits until the paused run has reached its pause."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before its pause:\n{process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run did not reach its pause in time")
        time.sleep(0.2)


def _ended(process: subprocess.Popen[str], timeout: float = 120) -> str:
    """The paused run's standard error once it has ended; fails, with its last lines, if it
    does not end within `timeout` seconds."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        stderr = process.communicate()[1]
        pytest.fail(f"the run did not end within {timeout:g} s of its signal:\n{stderr[-3000:]}")


def _digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in a directory, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _loss_curve(checkpoint: Path) -> list[dict[str, Any]]:
    """The log history in a checkpoint's trainer_state.json, without the timings."""
    history = read_json(checkpoint / "trainer_state.json")["log_history"]
    return [
        {k: v for k, v in entry.items() if not k.endswith(("runtime", "per_second", "seconds"))}
        for entry in history
    ]


def test_run_killed_mid_save_leaves_the_previous_best_model_whole(
    base_run: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "out"
    best = output_dir / "best_model"
    shutil.copytree(Path(base_run["output_dir"]) / "best_model", best)
    previous = _digests(best)
    marker = tmp_path / "paused"
    process = _paused_run(
        "save",
        marker,
        *("--data", str(EXAMPLE_DATA), "--model-id", str(tiny_model_dir)),
        *("--output-dir", str(output_dir), "--max_steps", "1", "--max-new-tokens", "4"),
    )
    _wait_for(marker, process)
    (staging,) = output_dir.glob(".best_model.tmp-*")  # the new model, half written
    assert {"adapter_model.safetensors", "metrics.json"} <= set(os.listdir(staging))
    assert "finetune_settings.json" not in os.listdir(staging)
    process.send_signal(signal.SIGKILL)
    _ended(process, timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert _digests(best) == previous  # byte for byte the previous complete model
    assert not (output_dir / "best_model.old").exists()
    # the next save clears the killed run's staging folder
    with atomic_directory(str(best)) as new:
        Path(new, "adapter_model.safetensors").write_bytes(b"new")
    assert os.listdir(best) == ["adapter_model.safetensors"]
    # and the killed run's lock file, which the next run takes over
    assert sorted(os.listdir(output_dir)) == [LOCK_FILE, "best_model", "checkpoints"]


def test_same_seed_run_killed_in_training_resumes_to_the_same_losses_and_answers(
    base_run: dict[str, Any], tmp_path: Path
) -> None:
    """A second run with base_run's seed and settings, interrupted (Ctrl-C) after its first
    epoch's checkpoint and resumed: every logged loss and every greedy answer are the same as
    those of base_run, which ran without a break."""
    output_dir = tmp_path / "out"
    inputs = {**base_run["inputs"], "output_dir": str(output_dir)}
    marker = tmp_path / "paused"
    process = _paused_run(
        "checkpoint",
        marker,
        *("--data", inputs["data_path"], "--model-id", inputs["model_id"]),
        *("--output-dir", inputs["output_dir"], "--num_train_epochs", "2"),
        *("--learning_rate", str(inputs["learning_rate"])),
    )
    _wait_for(marker, process)
    process.send_signal(signal.SIGINT)
    stderr = _ended(process)
    assert process.returncode == 130
    assert "error: interrupted" in stderr and "Traceback" not in stderr
    assert not (output_dir / "best_model").exists()
    (killed,) = (output_dir / "checkpoints").iterdir()

    base_metrics = base_run["result"]["training_and_validation_set_metrics"]
    last_checkpoint = f"checkpoint-{base_metrics['global_step']}"
    base_last = Path(base_run["output_dir"]) / "checkpoints" / last_checkpoint
    base_curve = _loss_curve(base_last)
    killed_curve = _loss_curve(killed)
    assert any("eval_loss" in entry for entry in killed_curve)
    assert killed_curve == base_curve[: len(killed_curve)]  # same seed, same first epoch

    resumed = run_dag("base", **inputs, resume_from_checkpoint=True)
    assert (
        resumed["training_and_validation_set_metrics"]["global_step"]
        == (base_metrics["global_step"])
    )
    assert _loss_curve(output_dir / "checkpoints" / base_last.name) == base_curve
    assert resumed["hold_out_set_predictions"] == base_run["result"]["hold_out_set_predictions"]
    assert (
        resumed["finetuned_model_on_validation_set"]
        == (base_run["result"]["finetuned_model_on_validation_set"])
    )
    assert resumed["training_and_validation_set_metrics"]["eval_loss"] == pytest.approx(
        base_metrics["eval_loss"], rel=1e-6
    )
    # the reported training loss covers the whole run, not only the steps after the resume
    assert resumed["training_and_validation_set_metrics"]["train_loss"] == pytest.approx(
        base_metrics["train_loss"], rel=1e-5
    )


def test_a_failed_save_leaves_the_previous_directory_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "best_model"
    target.mkdir()
    (target / "metrics.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_directory(str(target)) as staging:
        Path(staging, "metrics.json").write_text('{"new": 1}')
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["best_model"]
    assert (target / "metrics.json").read_text() == "{}"


def test_a_save_killed_between_its_renames_is_recovered(
    base_run: dict[str, Any], tmp_path: Path
) -> None:
    # what a kill between "best_model -> best_model.old" and "staging -> best_model" leaves
    saved = Path(base_run["output_dir"]) / "best_model"
    shutil.copytree(saved, tmp_path / "best_model.old")
    (tmp_path / ".best_model.tmp-x").mkdir()
    # start=presaved finds the previous model where the killed save left it
    found = presaved_model_dir(str(tmp_path / "best_model"), ModelSettings("m"))
    assert found == str(tmp_path / "best_model.old")
    # and the next save puts it back first, then replaces it whole
    with atomic_directory(str(tmp_path / "best_model")) as staging:
        assert _digests(tmp_path / "best_model") == _digests(saved)
        Path(staging, "metrics.json").write_text("{}")
    assert os.listdir(tmp_path) == ["best_model"]
    assert os.listdir(tmp_path / "best_model") == ["metrics.json"]


def _training_arguments(output_dir: Path, **inputs: Any) -> Any:
    """The training_arguments node on a small table, as the dataflow would compute it."""
    table = pd.DataFrame({"input_text": ["q"] * 16, "output_text": ["a"] * 16})
    cpu = torch.device("cpu")
    return training_arguments(
        train_set=table,
        device=cpu,
        run_dir=str(output_dir),
        training_settings=TrainingSettings(**inputs),
        model_recipe=ModelRecipe("m"),
        show_progress=False,
    )


def test_resume_picks_the_last_complete_checkpoint(
    base_run: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoints = tmp_path / "checkpoints"
    metrics = base_run["result"]["training_and_validation_set_metrics"]
    complete = Path(metrics["best_model_checkpoint"])
    shutil.copytree(complete, checkpoints / "checkpoint-5")
    shutil.copytree(complete, checkpoints / "checkpoint-12")  # killed while writing its state
    state = checkpoints / "checkpoint-12" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    (checkpoints / "checkpoint-20").mkdir()  # killed before it wrote anything but the folder
    (checkpoints / "runs").mkdir()
    arguments = _training_arguments(tmp_path, resume_from_checkpoint=True)
    assert arguments.resume_from_checkpoint == str(checkpoints / "checkpoint-5")
    given = _training_arguments(tmp_path, resume_from_checkpoint=str(complete))
    assert given.resume_from_checkpoint == str(complete)
    assert _training_arguments(tmp_path).resume_from_checkpoint is None
    with caplog.at_level("WARNING", logger="finetune_module.engine.trainer"):
        fresh = _training_arguments(tmp_path / "new", resume_from_checkpoint=True)
    assert fresh.resume_from_checkpoint is None
    assert "no complete checkpoint in" in caplog.text and "training from the start" in caplog.text
    assert not (tmp_path / "new").exists()
    with pytest.raises(SettingsError, match="is not a complete Trainer checkpoint"):
        _training_arguments(tmp_path, resume_from_checkpoint=str(checkpoints / "checkpoint-12"))
    with pytest.raises(SettingsError, match="is not a complete Trainer checkpoint"):
        _training_arguments(tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere"))
    pickled = checkpoints / "checkpoint-5"
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(SettingsError, match=r"has no \.safetensors weights"):
        _training_arguments(tmp_path, resume_from_checkpoint=str(pickled))


def test_base_run_can_continue_a_saved_adapter(
    base_run: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    inputs = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(tiny_model_dir),
        "init_adapter_path": str(saved),
        "r": 4,  # the saved adapter's own rank is kept
    }
    recipe = build_driver("base").execute(["model_recipe"], inputs=inputs)["model_recipe"]
    assert recipe.adapter_path == str(saved) and recipe.lora is None
    model = build_model(recipe, torch.device("cpu"), trainable=True)
    start = get_peft_model_state_dict(model)
    saved_weights = load_file(str(saved / "adapter_model.safetensors"))
    assert start.keys() == saved_weights.keys() and saved_weights
    assert all(torch.equal(start[k], saved_weights[k]) for k in saved_weights)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    result = run_dag("base", **inputs, output_dir=str(tmp_path), max_steps=2, max_new_tokens=4)
    assert result["training_and_validation_set_metrics"]["global_step"] == 2
    adapter_config = read_json(tmp_path / "best_model" / "adapter_config.json")
    assert adapter_config["r"] == read_json(saved / "adapter_config.json")["r"] != 4
    continued = load_file(str(tmp_path / "best_model" / "adapter_model.safetensors"))
    assert continued.keys() == saved_weights.keys()
    assert any(not torch.equal(continued[k], saved_weights[k]) for k in continued)  # it trained
    assert json.loads((tmp_path / "best_model" / "metrics.json").read_text())["hold_out"]
