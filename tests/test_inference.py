"""Using a saved fine-tune: predict (Python and CLI) and export (a merged model without peft)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import finetune_module
import run
from finetune_module.errors import DataError, ModelNotAvailableError, SettingsError
from tests.conftest import read_json

SHORT_QUESTIONS = ["How do I pin the versions?", "Can it run offline?"]  # under the input cap


def _hold_out(base_run: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The hold-out questions and the run's greedy answers to them."""
    rows = base_run["result"]["hold_out_set_predictions"]
    return [q for q, _, _ in rows], [p for _, p, _ in rows]


def test_predict_gives_the_runs_greedy_answers(base_run: dict[str, Any]) -> None:
    questions, answers = _hold_out(base_run)
    model_dir = base_run["result"]["save_best_models"]
    assert finetune_module.predict(model_dir, questions) == answers
    assert finetune_module.predict(model_dir, []) == []


def test_predict_refuses_bad_arguments(base_run: dict[str, Any], tmp_path: Path) -> None:
    model_dir = base_run["result"]["save_best_models"]
    with pytest.raises(SettingsError, match="wrap it in a list"):
        finetune_module.predict(model_dir, "one question")
    with pytest.raises(DataError, match=r"texts\[1\] is a int"):
        finetune_module.predict(model_dir, ["ok", 3])  # type: ignore[list-item]
    with pytest.raises(SettingsError, match="num_beams must be at least 1"):
        finetune_module.predict(model_dir, ["ok"], num_beams=0)
    with pytest.raises(ModelNotAvailableError, match="holds no saved model"):
        finetune_module.predict(str(tmp_path), ["ok"])


def test_read_texts_takes_lines_json_and_json_lines(tmp_path: Path) -> None:
    lines = tmp_path / "questions.txt"
    lines.write_text("first?\n\n  second?  \n", encoding="utf-8")
    assert finetune_module.read_texts(str(lines)) == ["first?", "second?"]
    records = tmp_path / "questions.json"
    records.write_text(json.dumps([{"question": "a?", "reply": "x"}, "b?"]), encoding="utf-8")
    assert finetune_module.read_texts(str(records)) == ["a?", "b?"]
    json_lines = tmp_path / "questions.jsonl"
    json_lines.write_text('{"q": "a?"}\n{"q": "b?"}\n', encoding="utf-8")
    assert finetune_module.read_texts(str(json_lines), "q") == ["a?", "b?"]
    with pytest.raises(DataError, match=r"questions.jsonl: record 1 has no key 'question'"):
        json_lines.write_text('{"question": "a?"}\n{"q": "b?"}\n', encoding="utf-8")
        finetune_module.read_texts(str(json_lines))
    with pytest.raises(DataError, match=r"record 0, key 'question': expected text, found int"):
        records.write_text('[{"question": 3}]', encoding="utf-8")
        finetune_module.read_texts(str(records))
    with pytest.raises(DataError, match="holds no questions"):
        records.write_text("[]", encoding="utf-8")
        finetune_module.read_texts(str(records))
    with pytest.raises(DataError, match=r"questions\.txt: the file is empty"):
        lines.write_text("\n \n", encoding="utf-8")
        finetune_module.read_texts(str(lines))
    with pytest.raises(DataError, match="no such file"):
        finetune_module.read_texts(str(tmp_path / "missing.txt"))


def test_predict_command_answers_questions_and_files(
    base_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions, answers = _hold_out(base_run)
    model_dir = base_run["result"]["save_best_models"]
    question_file = tmp_path / "more.jsonl"
    question_file.write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in questions[1:]), encoding="utf-8"
    )
    status = run.main(
        ["predict", "--model-dir", model_dir, questions[0], "--file", str(question_file), "--jsonl"]
    )
    assert status == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = zip(questions, answers, strict=True)
    assert printed == [{"question": q, "prediction": a} for q, a in expected]

    assert run.main(["predict", "--model-dir", model_dir, "--max-new-tokens", "3", "hi?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1

    bad = tmp_path / "bad.json"
    bad.write_text('[{"reply": "no question"}]', encoding="utf-8")
    assert run.main(["predict", "--model-dir", model_dir, "--file", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bad}: no record has the key 'question'; keys found: 'reply'."
    )
    assert run.main(["predict", "--model-dir", model_dir]) == 2
    assert "Give questions to answer, or --file" in capsys.readouterr().err


def test_export_merges_the_adapter_into_a_plain_model(
    base_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = base_run["result"]["save_best_models"]
    merged = tmp_path / "merged"
    assert run.main(["export", "--model-dir", model_dir, "--to", str(merged)]) == 0
    assert f"Exported the merged model to {merged}" in capsys.readouterr().out
    names = set(os.listdir(merged))
    assert {"config.json", "model.safetensors", "tokenizer.json", "finetune_settings.json"} <= (
        names
    )
    assert "adapter_config.json" not in names
    assert not any("lora" in key for key in load_file(str(merged / "model.safetensors")))
    assert read_json(merged / "finetune_settings.json") == read_json(
        Path(model_dir) / "finetune_settings.json"
    )
    # same greedy answers as the adapter model, through predict ...
    adapter_answers = finetune_module.predict(model_dir, SHORT_QUESTIONS, max_new_tokens=6)
    assert finetune_module.predict(str(merged), SHORT_QUESTIONS, max_new_tokens=6) == (
        adapter_answers
    )
    # ... and loaded with plain transformers in a process where peft cannot even be imported
    script = (
        "import json, sys\n"
        "sys.modules['peft'] = None\n"
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
        "model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1]).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "batch = tokenizer(json.loads(sys.argv[2]), return_tensors='pt', padding=True)\n"
        "out = model.generate(**batch, max_new_tokens=6, do_sample=False, num_beams=1)\n"
        "print(json.dumps(tokenizer.batch_decode(out, skip_special_tokens=True)))\n"
    )
    plain = subprocess.run(
        [sys.executable, "-c", script, str(merged), json.dumps(SHORT_QUESTIONS)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr
    assert [a.strip() for a in json.loads(plain.stdout)] == adapter_answers


def test_merged_weights_equal_base_plus_adapter(base_run: dict[str, Any], tmp_path: Path) -> None:
    """The merged model computes what the adapter model computes (logits to float precision)."""
    model_dir = base_run["result"]["save_best_models"]
    merged_dir = finetune_module.export_merged(model_dir, str(tmp_path / "merged"))
    merged = AutoModelForSeq2SeqLM.from_pretrained(merged_dir).eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(base_run["inputs"]["model_id"]).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained(base_run["inputs"]["model_id"]), model_dir
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(SHORT_QUESTIONS, return_tensors="pt", padding=True)
    decoder = torch.tensor([[0, 5, 9]] * len(SHORT_QUESTIONS))
    with torch.inference_mode():
        logits = {
            name: m(**batch, decoder_input_ids=decoder).logits
            for name, m in (("merged", merged), ("adapted", adapted), ("base", base))
        }
    torch.testing.assert_close(logits["merged"], logits["adapted"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["merged"], logits["base"], atol=1e-3)  # the adapter is in


def test_export_refuses_to_overwrite_its_source_or_a_non_adapter(
    base_run: dict[str, Any], tiny_model_dir: Path
) -> None:
    model_dir = base_run["result"]["save_best_models"]
    with pytest.raises(SettingsError, match="would replace the adapter"):
        finetune_module.export_merged(model_dir, model_dir)
    with pytest.raises(ModelNotAvailableError, match="No LoRA adapter in"):
        finetune_module.export_merged(str(tiny_model_dir), "/nonexistent/never-written")
    assert (Path(model_dir) / "adapter_config.json").is_file()


def test_commands_find_the_model_in_a_run_directory_or_a_checkpoint(
    base_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions, answers = _hold_out(base_run)
    best = Path(base_run["result"]["save_best_models"])
    run_dir = best.parent
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints
    for model_dir in (run_dir, best, checkpoints[-1]):  # the run dir means its best model
        assert run.main(["predict", "--model-dir", str(model_dir), *questions]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert len(printed) == len(questions)
        if model_dir != checkpoints[-1]:
            assert printed == [" ".join(answer.splitlines()) for answer in answers]
    assert run.main(["export", "--model_dir", str(run_dir), "--to", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert finetune_module.predict(str(tmp_path / "m"), questions) == answers
    # evaluate: the same run directory, evaluated into another one
    inputs = base_run["inputs"]
    evaluation = tmp_path / "evaluation-run"
    argv = ["evaluate", str(run_dir), "--data", inputs["data_path"], "--quiet"]
    assert run.main([*argv, "--model_id", inputs["model_id"], "--output_dir", str(evaluation)]) == 0
    rows = pd.read_csv(
        evaluation / "evaluation" / "hold_out_predictions.csv", keep_default_na=False
    )
    assert rows["prediction"].tolist() == answers
    capsys.readouterr()
    # a directory without a model, and a run that has checkpoints but no best model yet
    assert run.main(["predict", "--model-dir", str(tmp_path), "hi?"]) == 2
    assert "holds no saved model" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    os.symlink(checkpoints[-1], unfinished / "checkpoints" / checkpoints[-1].name)
    assert run.main(["export", "--model-dir", str(unfinished), "--to", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "no best model yet" in error and checkpoints[-1].name in error
    assert not (tmp_path / "x").exists()
