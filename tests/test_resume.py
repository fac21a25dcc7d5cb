"""Resume only what fits: a checkpoint continues a run only if it was written by a run with
the same base model, adapter shape and data, and is not beyond the run's last step; anything
else is refused before training with one line saying what differs (exit 2 from the CLI).
Checkpoints also hold the run's caps, so that predicting from one stays bounded."""

import json
from pathlib import Path
from typing import Any

import pytest

import finetune_module
import run
from finetune_module import inference
from finetune_module.engine.files import SETTINGS_FILE
from finetune_module.engine.tokens import DEFAULT_INPUT_LIMIT
from finetune_module.engine.trainer import RUN_RECORD_FILE
from finetune_module.errors import DataError, SettingsError
from finetune_module.tiny_model import build_t5, texts_of
from tests.conftest import EXAMPLE_DATA, TINY, run_dag

FIRST = {"max_steps": 2, "max_new_tokens": 2, "quiet": True}


@pytest.fixture
def first_run(tiny_model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """Inputs of a short run (rank 4, 2 steps) whose checkpoint-2 is in `tmp_path / "out"`."""
    inputs = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(tiny_model_dir),
        "output_dir": str(tmp_path / "out"),
        "r": 4,
        **FIRST,
    }
    run_dag("base", **inputs)
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-2" / RUN_RECORD_FILE).exists()
    return inputs


def _resume(inputs: dict[str, Any], **changes: Any) -> None:
    run_dag("base", **{**inputs, "max_steps": 4, **changes, "resume_from_checkpoint": True})


def test_a_checkpoint_of_another_adapter_shape_is_refused(first_run: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as refused:
        _resume(first_run, r=8)
    message = str(refused.value)
    assert "checkpoint-2 was written by a run with another adapter" in message
    assert '"r": 4' in message and '"r": 8' in message


def test_a_checkpoint_of_another_base_model_is_refused(
    first_run: dict[str, Any], tmp_path: Path
) -> None:
    other = build_t5(str(tmp_path / "other"), texts_of(str(EXAMPLE_DATA)), **TINY, seed=1)
    with pytest.raises(SettingsError, match=f"another base model {first_run['model_id']}, not"):
        _resume(first_run, model_id=other)


def test_a_checkpoint_of_other_data_is_refused(first_run: dict[str, Any], tmp_path: Path) -> None:
    records = json.loads(EXAMPLE_DATA.read_text(encoding="utf-8"))
    records[0]["reply"] = "A different answer."
    other = tmp_path / "other.json"
    other.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(SettingsError, match=r"another training data \(fingerprint"):
        _resume(first_run, data_path=str(other))


def test_a_checkpoint_beyond_the_requested_steps_is_refused(first_run: dict[str, Any]) -> None:
    with pytest.raises(SettingsError, match="checkpoint-2 is at step 2, beyond this run's 1 steps"):
        _resume(first_run, max_steps=1)


def test_a_checkpoint_without_a_run_record_is_refused(first_run: dict[str, Any]) -> None:
    (Path(first_run["output_dir"]) / "checkpoints" / "checkpoint-2" / RUN_RECORD_FILE).unlink()
    with pytest.raises(SettingsError, match=f"has no readable {RUN_RECORD_FILE}"):
        _resume(first_run)


def test_a_fitting_checkpoint_is_resumed_to_the_end(first_run: dict[str, Any]) -> None:
    result = run_dag("base", **{**first_run, "max_steps": 4, "resume_from_checkpoint": True})
    metrics = result["training_and_validation_set_metrics"]
    assert metrics["global_step"] == 4


def test_the_cli_refuses_an_unfitting_checkpoint_with_exit_2_and_one_line(
    first_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--data", first_run["data_path"], "--model-id", first_run["model_id"],
        "--output-dir", first_run["output_dir"], "--max-steps", "4", "--r", "8",
        "--resume_from_checkpoint", "--quiet",
    ]  # fmt: skip
    assert run.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "written by a run with another adapter" in error
    assert not (Path(first_run["output_dir"]) / "checkpoints" / "checkpoint-4").exists()


def test_checkpoints_hold_the_runs_caps_and_predict_stays_bounded_on_them(
    first_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """predict on a checkpoint uses the caps the run trained with, which the checkpoint holds;
    a model saved without them is capped at its own input limit: any question stays bounded."""
    checkpoint = Path(first_run["output_dir"]) / "checkpoints" / "checkpoint-2"
    saved = json.loads((checkpoint / SETTINGS_FILE).read_text(encoding="utf-8"))
    best = json.loads(
        (Path(first_run["output_dir"]) / "best_model" / SETTINGS_FILE).read_text(encoding="utf-8")
    )
    for key in ("source_length_cap", "target_length_cap", "prompt_template"):
        assert saved[key] == best[key]
    lengths: list[int] = []
    answer = inference.generate

    def measured(model: Any, tokenizer: Any, examples: list[dict[str, Any]], **kw: Any) -> Any:
        lengths.extend(len(e["input_ids"]) for e in examples)
        return answer(model, tokenizer, examples, **kw)

    monkeypatch.setattr(inference, "generate", measured)
    huge = "why " * 25_000  # 100,000 characters
    finetune_module.predict(str(checkpoint), [huge, "short?"], max_new_tokens=2)
    assert max(lengths) == saved["source_length_cap"]
    (checkpoint / SETTINGS_FILE).unlink()  # a model saved without its run's caps
    lengths.clear()
    finetune_module.predict(str(checkpoint), [huge], max_new_tokens=2)
    assert lengths == [DEFAULT_INPUT_LIMIT]  # the tiny T5 has no position table
    with pytest.raises(DataError, match=r"texts\[1\]: empty text"):
        finetune_module.predict(str(checkpoint), ["fine", "  "])


@pytest.mark.parametrize("saved", ["best_model", "checkpoints/checkpoint-2"])
def test_presaved_takes_the_caps_saved_with_the_fine_tune(
    saved: str, first_run: dict[str, Any], tmp_path: Path
) -> None:
    records = json.loads(EXAMPLE_DATA.read_text(encoding="utf-8"))
    for record in records:
        record["question"] = "why " * 2_500 + record["question"]  # 10,000 characters more
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    model_dir = Path(first_run["output_dir"]) / saved
    caps = json.loads((model_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
    result = finetune_module.build_driver("presaved").execute(
        ["source_length_cap", "target_length_cap", "tokenized_validation", "tokenized_hold_out"],
        inputs={
            "data_path": str(data), "input_text_key": "question", "output_text_key": "reply",
            "model_id": first_run["model_id"], "presaved_model_path": str(model_dir),
            "output_dir": str(tmp_path / "eval"),
        },
    )  # fmt: skip
    assert result["source_length_cap"] == caps["source_length_cap"]
    assert result["target_length_cap"] == caps["target_length_cap"]
    examples = [*result["tokenized_validation"], *result["tokenized_hold_out"]]
    assert max(len(example["input_ids"]) for example in examples) == caps["source_length_cap"]
