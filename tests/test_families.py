"""The model families a user brings, each a tiny model with its own kind of tokenizer
(`tiny_model.FAMILIES`): the whole public contract runs on each one. LoRA from the base model,
`start: presaved`, `predict` and `export_merged` give the same greedy answers; a full
fine-tune trains and saves every weight, and its best checkpoint comes back whole. (The speed
layer is proven equal to the stock path per family in test_speedups.py.)"""

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Seq2SeqTrainingArguments,
)

import finetune_module
from finetune_module.engine import speedups
from finetune_module.engine.loading import load_pretrained
from finetune_module.engine.models import lora_config, model_config
from finetune_module.engine.settings import LoraSettings
from finetune_module.engine.tokens import with_pad_token
from finetune_module.engine.trainer import FinetuneTrainer, PromptAnswerCollator, seq2seq_collator
from finetune_module.errors import SettingsError
from finetune_module.tiny_model import FAMILIES
from tests.conftest import EXAMPLE_DATA, read_json

FAST = {
    "data_path": str(EXAMPLE_DATA),
    "input_text_key": "question",
    "output_text_key": "reply",
    "max_steps": 2,
    "max_new_tokens": 6,
    "quiet": True,
}
OUTPUTS = ["save_best_models", "hold_out_set_predictions", "training_and_validation_set_metrics"]


def _run(family: str, start: str, *, lora: bool = True, **inputs: Any) -> dict[str, Any]:
    config = {"model_type": FAMILIES[family].kind}
    if not lora:
        config["use_lora"] = False
    dr = finetune_module.build_driver(start, **config)
    return dr.execute(OUTPUTS, inputs={**FAST, **inputs})


def _answers(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The hold-out questions and the greedy answers a run gave to them."""
    rows = result["hold_out_set_predictions"]
    return [question for question, _, _ in rows], [answer for _, answer, _ in rows]


def _auto(family: str) -> type:
    return AutoModelForSeq2SeqLM if FAMILIES[family].kind == "seq2seq" else AutoModelForCausalLM


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_presaved_predict_and_export_agree(
    family: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = family_model(family)
    lora = _run(family, "base", model_id=str(model_dir), output_dir=str(tmp_path / "lora"))
    saved = lora["save_best_models"]
    questions, answers = _answers(lora)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    metrics = lora["training_and_validation_set_metrics"]
    assert metrics["global_step"] == 2 and torch.isfinite(torch.tensor(metrics["train_loss"]))

    # the adapter sits on the layers chosen for the family, and the recipe names the speed-ups
    # that apply to it: exactly those proven for it
    expected = lora_config(LoraSettings(), _auto(family).from_config(model_config(str(model_dir))))
    adapter = read_json(Path(saved) / "adapter_config.json")
    assert sorted(adapter["target_modules"]) == sorted(expected.target_modules)
    recipe = read_json(Path(saved) / "finetune_settings.json")["model_recipe"]
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if torch.cuda.is_available():
        assert recipe["speedups"] == []
    else:
        assert tuple(recipe["speedups"]) == speedups.PROVEN[model_type]

    again = _run(
        family, "presaved", model_id=str(model_dir), presaved_model_path=saved,
        output_dir=str(tmp_path / "presaved"),
    )  # fmt: skip
    assert _answers(again) == (questions, answers)
    assert finetune_module.predict(saved, questions) == answers
    merged = finetune_module.export_merged(saved, str(tmp_path / "export"))
    assert not (Path(merged) / "adapter_config.json").exists()
    assert (Path(merged) / "model.safetensors").exists()
    assert finetune_module.predict(merged, questions) == answers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetune_trains_every_weight_and_its_answers_come_back(
    family: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = family_model(family)
    full = _run(
        family, "base", lora=False, model_id=str(model_dir), output_dir=str(tmp_path / "full"),
        learning_rate=1e-2,
    )  # fmt: skip
    saved = Path(full["save_best_models"])
    assert not (saved / "adapter_config.json").exists()
    base = _auto(family).from_pretrained(model_dir)
    before, after = base.state_dict(), _auto(family).from_pretrained(saved).state_dict()
    assert after.keys() == before.keys()
    trained = [name for name in before if not torch.equal(before[name], after[name])]
    # every weight matrix moved (norms and biases may start where their gradient is 0; fixed
    # sinusoidal positions and buffers are not trained)
    fixed = {
        f"{name}.{weight}"
        for name, module in base.named_modules()
        if "Sinusoidal" in type(module).__name__  # Marian's positions: computed, not trained
        for weight, _ in module.named_parameters()
    }
    matrices = [n for n, p in base.named_parameters() if p.dim() == 2 and n not in fixed]
    assert set(matrices) <= set(trained), sorted(set(matrices) - set(trained))
    questions, answers = _answers(full)
    assert finetune_module.predict(str(saved), questions) == answers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_best_checkpoint_comes_back_whole(
    family: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """The Trainer loads a checkpoint by the names its tensors are saved under; a family that
    saves some weights under other names (GPT-NeoX's output layer) must still get all of them
    back when an earlier checkpoint is the best one, not keep the last step's."""
    model_dir = family_model(family)
    tokenizer = with_pad_token(load_pretrained(AutoTokenizer.from_pretrained, str(model_dir)))
    model = _auto(family).from_pretrained(model_dir)
    ids = tokenizer(["How do I pin the versions?", "Can it run offline?"])["input_ids"]
    rows = [{"input_ids": i, "labels": i[:4]} for i in ids]
    collator = (
        seq2seq_collator(tokenizer, model.device)
        if model.config.is_encoder_decoder
        else PromptAnswerCollator(tokenizer.pad_token_id)
    )
    args = Seq2SeqTrainingArguments(
        str(tmp_path), use_cpu=not torch.cuda.is_available(), report_to="none", max_steps=2,
        save_strategy="steps", save_steps=1, learning_rate=0.05, per_device_train_batch_size=2,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    first = tmp_path / "checkpoint-1"
    expected = _auto(family).from_pretrained(first).state_dict()
    assert any(not torch.equal(expected[k], v) for k, v in model.state_dict().items())
    trainer.state.best_model_checkpoint = str(first)
    trainer._load_best_model()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_a_model_that_cannot_answer_is_refused_before_training(tmp_path: Path) -> None:
    """An encoder-only model (BERT) cannot generate answers: one clear error, no training."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}, "[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    config = BertConfig(vocab_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    for model_type in ("seq2seq", "causal"):
        dr = finetune_module.build_driver("base", model_type=model_type)
        with pytest.raises(SettingsError) as refused:
            dr.execute(
                ["fitted_weights"],
                inputs={**FAST, "model_id": str(tmp_path / "bert"), "output_dir": str(tmp_path)},
            )
        assert "is an encoder-only model (bert: BertForMaskedLM)" in str(refused.value)
        assert not (tmp_path / "checkpoints").exists()


def test_a_causal_tokenizer_without_an_end_token_is_refused_before_training(
    family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "no-end"
    shutil.copytree(family_model("gpt2"), model_dir)
    tokenizer_config = model_dir / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["eos_token"] = None
    tokenizer_config.write_text(json.dumps(settings))
    dr = finetune_module.build_driver("base", model_type="causal")
    with pytest.raises(SettingsError, match="has no end-of-sequence token"):
        dr.execute(
            ["fitted_weights"],
            inputs={**FAST, "model_id": str(model_dir), "output_dir": str(tmp_path / "run")},
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_family_table_in_the_docs_lists_every_family() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "model-families.md").read_text()
    rows = {match[1] for match in re.finditer(r"^\| `([^`]+)`", text, re.MULTILINE)}
    assert set(FAMILIES) <= rows, sorted(set(FAMILIES) - rows)
