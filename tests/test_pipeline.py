"""The whole dataflow on a tiny local model, in both configs, as a user's run file runs it."""

import gc
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hamilton import driver
from huggingface_hub import utils as hub_utils
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.generation.utils import GenerationMixin
from transformers.utils import logging as transformers_logging

import finetune_module
from finetune_module.engine import generation
from finetune_module.engine.records import split_sizes
from finetune_module.engine.trainer import trainer_callbacks
from finetune_module.errors import ModelNotAvailableError, SettingsError
from tests.conftest import EXAMPLE_DATA, QUICK, read_json, run_dag

N_TRAIN, N_VALIDATION, N_HOLD_OUT = split_sizes(len(read_json(EXAMPLE_DATA)), 0.95, 0.8)


def test_base_run_returns_the_four_outputs(base_run: dict[str, Any]) -> None:
    result = base_run["result"]
    assert set(result) == set(finetune_module.DEFAULT_OUTPUTS)
    validation = result["finetuned_model_on_validation_set"]
    assert (
        len(validation["validation_predictions"])
        == len(validation["validation_references"])
        == N_VALIDATION
    )
    assert all(isinstance(p, str) for p in validation["validation_predictions"])
    holdout = result["hold_out_set_predictions"]
    assert len(holdout) == N_HOLD_OUT and all(len(row) == 3 for row in holdout)
    metrics = result["training_and_validation_set_metrics"]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0.0 <= metrics[key] <= 100.0
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["train_loss"])
    assert metrics["global_step"] == 2 * math.ceil(N_TRAIN / 8)
    # the best checkpoint is the one with the lowest validation loss, and it was loaded back
    assert metrics["eval_loss"] == pytest.approx(metrics["best_eval_loss"], rel=1e-4)


def test_training_lowers_the_validation_loss(base_run: dict[str, Any]) -> None:
    checkpoint = Path(
        base_run["result"]["training_and_validation_set_metrics"]["best_model_checkpoint"]
    )
    history = read_json(checkpoint / "trainer_state.json")["log_history"]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(eval_losses) == 2  # evaluated once per epoch
    assert eval_losses[-1] < eval_losses[0]
    assert train_losses[-1] < train_losses[0]


def test_saved_files(base_run: dict[str, Any]) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    assert saved == Path(base_run["output_dir"]) / "best_model"
    names = {p.name for p in saved.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "metrics.json",
        "hold_out_predictions.csv",
        "validation_predictions.csv",
        "finetune_settings.json",
        "base_model_predictions.csv",
        "training_log.csv",
        "report.html",
    } <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    weights = load_file(str(saved / "adapter_model.safetensors"))
    assert weights and all("lora_" in key for key in weights)
    assert read_json(saved / "adapter_config.json")["target_modules"] in (["q", "v"], ["v", "q"])
    metrics = read_json(saved / "metrics.json")
    assert (
        metrics["training_and_validation"]["rougeL"]
        == (base_run["result"]["training_and_validation_set_metrics"]["rougeL"])
    )
    assert set(metrics["hold_out"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    table = pd.read_csv(saved / "hold_out_predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["question", "prediction", "reference"]
    assert [tuple(row) for row in table.itertuples(index=False)] == (
        base_run["result"]["hold_out_set_predictions"]
    )
    settings = read_json(saved / "finetune_settings.json")
    assert settings["max_new_tokens"] == settings["target_length_cap"] > 1
    recipe = settings["model_recipe"]  # how the model was built
    assert recipe["model_id"] == base_run["inputs"]["model_id"] and recipe["adapter_path"] is None
    assert recipe["lora"] == {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": ["q", "v"],
    }
    assert recipe["model_type"] == "seq2seq"
    # the CPU speed layer: on by default where the model trains on the CPU, off on a GPU
    assert ("fused_gelu" in recipe["speedups"]) == (not torch.cuda.is_available())
    assert not list(Path(base_run["output_dir"]).glob(".best_model.tmp-*"))


def test_each_model_answers_both_sets_in_one_pass(
    base_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    generate, lean = GenerationMixin.generate, generation.greedy_generate

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append(kwargs["input_ids"].shape[0])
        return generate(self, *args, **kwargs)

    def lean_counting(model: Any, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batches.append(input_ids.shape[0])
        return lean(model, input_ids, *args, **kwargs)

    # the batches answered by Hugging Face generate and by the lean decoding loop
    monkeypatch.setattr(GenerationMixin, "generate", counting)
    monkeypatch.setattr(generation, "greedy_generate", lean_counting)
    inputs = {k: v for k, v in base_run["inputs"].items() if k in ("data_path", "output_dir")}
    result = run_dag("presaved", **inputs)
    # the fine-tuned model, then the base model: one batch each holds both sets' questions
    assert batches == [N_VALIDATION + N_HOLD_OUT] * 2
    assert len(result["hold_out_set_predictions"]) == N_HOLD_OUT


def test_presaved_reproduces_the_saved_runs_greedy_answers(base_run: dict[str, Any]) -> None:
    inputs = {k: v for k, v in base_run["inputs"].items() if k in ("data_path", "output_dir")}
    result = run_dag("presaved", **inputs)
    assert set(result) == set(finetune_module.DEFAULT_OUTPUTS)
    assert result["hold_out_set_predictions"] == base_run["result"]["hold_out_set_predictions"]
    assert (
        result["finetuned_model_on_validation_set"]
        == (base_run["result"]["finetuned_model_on_validation_set"])
    )
    metrics = result["training_and_validation_set_metrics"]
    base_metrics = base_run["result"]["training_and_validation_set_metrics"]
    assert metrics["eval_loss"] == pytest.approx(base_metrics["eval_loss"], rel=1e-5)
    assert metrics["rougeL"] == base_metrics["rougeL"]
    evaluation = Path(result["save_best_models"])
    assert evaluation == Path(base_run["output_dir"]) / "evaluation"
    assert read_json(evaluation / "metrics.json")["model_dir"].endswith("best_model")
    for key in ("base_rougeL", "rougeL_gain"):  # base vs fine-tuned, also without training
        assert metrics[key] == base_metrics[key]
    saved = read_json(evaluation / "metrics.json")["base_vs_finetuned"]
    assert (
        saved
        == read_json(Path(base_run["output_dir"]) / "best_model" / "metrics.json")[
            "base_vs_finetuned"
        ]
    )
    assert (evaluation / "report.html").read_text("utf-8").startswith("<!DOCTYPE html>")
    assert (evaluation / "base_model_predictions.csv").is_file()


def test_presaved_loads_any_checkpoint_directory(base_run: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = base_run["result"]["training_and_validation_set_metrics"]["best_model_checkpoint"]
    result = run_dag(
        "presaved",
        data_path=base_run["inputs"]["data_path"],
        presaved_model_path=checkpoint,
        output_dir=str(tmp_path),
    )
    assert result["hold_out_set_predictions"] == base_run["result"]["hold_out_set_predictions"]


def test_save_best_models_depends_on_the_fitted_weights() -> None:
    dr = (
        driver.Builder()
        .with_config({"start": "base"})
        .with_modules(*finetune_module.MODULES)
        .build()
    )
    upstream = {node.name for node in dr.what_is_upstream_of("save_best_models")}
    assert "fitted_weights" in upstream


def test_max_steps_shorter_than_an_epoch_still_evaluates_and_keeps_the_best(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = run_dag(
        "base",
        data_path=str(EXAMPLE_DATA),
        model_id=str(tiny_model_dir),
        output_dir=str(tmp_path),
        max_steps=3,
        split_strategy="last",
        num_beams=2,
        max_new_tokens=5,
        extra_training_args={"warmup_steps": 1},
    )
    metrics = result["training_and_validation_set_metrics"]
    assert metrics["global_step"] == 3 and metrics["best_model_checkpoint"].endswith("checkpoint-3")
    settings = read_json(tmp_path / "best_model" / "finetune_settings.json")
    assert settings["num_beams"] == 2 and settings["max_new_tokens"] == 5


def test_unknown_training_argument_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"Unknown Seq2SeqTrainingArguments .*: no_such_arg"):
        run_dag(
            "base",
            data_path=str(EXAMPLE_DATA),
            model_id=str(tiny_model_dir),
            output_dir=str(tmp_path),
            extra_training_args={"no_such_arg": 1},
        )
    assert not (tmp_path / "best_model").exists()


def test_unreachable_hub_says_so_and_points_to_a_local_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError) as error:
        run_dag("base", data_path=str(EXAMPLE_DATA), output_dir=str(tmp_path))
    message = str(error.value)
    assert "'google/flan-t5-small'" in message and "Hugging Face Hub" in message
    assert "python -m finetune_module.tiny_model" in message
    assert not (tmp_path / "best_model").exists()


def _library_output_settings() -> tuple[int, bool, bool]:
    return (
        transformers_logging.get_verbosity(),
        transformers_logging.is_progress_bar_enabled(),
        hub_utils.are_progress_bars_disabled(),
    )


def test_a_quiet_run_prints_nothing_and_leaves_the_libraries_as_they_were(
    tiny_model_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
) -> None:
    before = _library_output_settings()
    inputs = {"data_path": str(EXAMPLE_DATA), "model_id": str(tiny_model_dir), **QUICK}
    run_dag("base", **inputs, output_dir=str(tmp_path), quiet=True)
    out, err = capfd.readouterr()
    assert out == err == ""  # no "Loading weights" bar, no training or generation bar
    libraries = [w for w in recwarn if "site-packages" in w.filename]
    assert not libraries, [f"{w.filename}: {w.message}" for w in libraries]
    assert _library_output_settings() == before


class _FreezeProbe(TrainerCallback):
    """Records how many objects the garbage collector leaves out (frozen) at each step."""

    def __init__(self) -> None:
        self.frozen: list[int] = []

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.frozen.append(gc.get_freeze_count())


@pytest.mark.parametrize("program_froze", [False, True])
def test_training_keeps_the_objects_alive_before_it_out_of_the_collectors_passes(
    tiny_model_dir: Path, tmp_path: Path, program_froze: bool
) -> None:
    probe = _FreezeProbe()
    inputs = {"data_path": str(EXAMPLE_DATA), "model_id": str(tiny_model_dir), **QUICK}
    if program_froze:
        gc.freeze()
    before = gc.get_freeze_count()
    try:
        with trainer_callbacks([probe]):
            run_dag("base", **inputs, output_dir=str(tmp_path), quiet=True)
        after = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert len(probe.frozen) == QUICK["max_steps"]
    if program_froze:  # the program's own freeze is left as it was, neither added to nor
        # undone (frozen objects that are freed leave it, so it may only shrink)
        assert all(0 < count <= before for count in [*probe.frozen, after])
    else:  # the libraries, the model and the data: far more objects than a run makes
        assert before == 0 and after == 0
        assert min(probe.frozen) > 10_000


def test_presaved_without_a_saved_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="No saved fine-tune in"):
        run_dag("presaved", data_path=str(EXAMPLE_DATA), output_dir=str(tmp_path))
