"""Cached re-runs (run.py --cache, Hamilton's caching): the second run takes the tokenized data
and the trained adapter from the cache and does not train; a changed generation setting
recomputes generation only; a changed training setting trains again."""

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

import run
from finetune_module.engine.models import model_files_identity
from tests.conftest import EXAMPLE_DATA, QUICK, read_json

TRAINING = "fitted_weights"  # the node that trains
NOT_RECOMPUTED = {TRAINING, "tokenized_train", "tokenized_validation", "source_token_ids"}


def _runs(cache_dir: Path) -> list[dict[str, set[str]]]:
    """Per run, in order, from Hamilton's cache log: the nodes executed and those retrieved."""
    runs: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"executed": set(), "hit": set()})
    for line in (cache_dir / "cache_logs.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event_type"] == "execute_node":
            runs[event["run_id"]]["executed"].add(event["node_name"])
        elif event["event_type"] == "get_result":
            runs[event["run_id"]]["hit"].add(event["node_name"])
    return list(runs.values())


def _checkpoints(output_dir: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in (output_dir / "checkpoints").rglob("*")}


def test_second_run_skips_training_and_beams_recompute_only_generation(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Parquet with its own split column: this is also the end-to-end run of that source
    pytest.importorskip("pyarrow")
    records = read_json(EXAMPLE_DATA)[:200]
    folds = [
        "validation" if i % 10 == 1 else "test" if i % 20 == 2 else "train" for i in range(200)
    ]
    data = tmp_path / "qa.parquet"
    pd.DataFrame([{**r, "fold": f} for r, f in zip(records, folds, strict=True)]).to_parquet(data)
    cache, output = tmp_path / "cache", tmp_path / "out"
    argv = [
        "--data", str(data), "--split-column", "fold", "--model-id", str(tiny_model_dir),
        "--output-dir", str(output), "--cache", str(cache),
        "--max_steps", str(QUICK["max_steps"]), "--max-new-tokens", str(QUICK["max_new_tokens"]),
    ]  # fmt: skip

    assert run.main(argv) == 0
    first_checkpoints = _checkpoints(output)
    assert first_checkpoints
    first_answers = pd.read_csv(output / "best_model" / "hold_out_predictions.csv")
    first_base_answers = pd.read_csv(output / "best_model" / "base_model_predictions.csv")
    assert len(first_answers) == folds.count("test")

    assert run.main(argv) == 0  # same data, model and settings
    assert _checkpoints(output) == first_checkpoints  # nothing trained, nothing written there
    pd.testing.assert_frame_equal(
        pd.read_csv(output / "best_model" / "hold_out_predictions.csv"), first_answers
    )

    assert run.main([*argv, "--num-beams", "2"]) == 0  # a generation setting changed
    assert read_json(output / "best_model" / "finetune_settings.json")["num_beams"] == 2

    assert run.main([*argv, "--learning_rate", "0.01"]) == 0  # a training setting changed
    pd.testing.assert_frame_equal(
        pd.read_csv(output / "best_model" / "base_model_predictions.csv"), first_base_answers
    )

    first, second, beams, learning_rate = _runs(cache)
    assert first["executed"] >= NOT_RECOMPUTED
    assert second["hit"] >= NOT_RECOMPUTED and not NOT_RECOMPUTED & second["executed"]
    assert beams["hit"] >= NOT_RECOMPUTED and not NOT_RECOMPUTED & beams["executed"]
    assert "generation_settings" in beams["executed"] - second["executed"]
    assert {"hold_out_set_predictions", "finetuned_model_on_validation_set"} <= beams["executed"]
    assert TRAINING in learning_rate["executed"]
    assert "tokenized_train" in learning_rate["hit"]  # the data did not change
    # the base model's answers: generated once per generation setting, whatever the training
    assert "base_answers" in first["executed"] and "base_answers" in beams["executed"]
    for run_ in (second, learning_rate):
        assert "base_answers" in run_["hit"] and "base_answers" not in run_["executed"]
    assert "finetuned_answers" in learning_rate["executed"]
    out = capsys.readouterr().out
    assert f"Cache {cache}: re-used" in out and "fitted_weights" in out


def test_the_base_models_identity_follows_its_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = model_files_identity(str(model))
    assert [name for name, _, _ in before] == sorted(p.name for p in model.iterdir())
    assert model_files_identity(str(model)) == before  # nothing read, nothing changed
    config = model / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": 1}', 1))
    assert model_files_identity(str(model)) != before
    assert model_files_identity("no-such-org/no-such-model") == []  # not in the hub's cache
