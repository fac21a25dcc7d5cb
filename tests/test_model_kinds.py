"""More model and task kinds: decoder-only models, prompt templates with context, class-label
targets, full fine-tuning, and every config of valid_configs.jsonl run end to end."""

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hamilton import driver
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import finetune_module
import run
from finetune_module.data import prompt_texts, qa_table
from finetune_module.engine import models
from finetune_module.engine.generation import generate
from finetune_module.engine.metrics import (
    OTHER_LABEL,
    confusion_counts,
    labels_of,
    macro_f1,
    text_metrics,
)
from finetune_module.engine.models import build_model
from finetune_module.engine.records import split_sizes
from finetune_module.engine.settings import EvaluationSettings, ModelSettings
from finetune_module.engine.tokens import IGNORE_INDEX, truncate_middle
from finetune_module.engine.trainer import PromptAnswerCollator
from finetune_module.errors import DataError, SettingsError
from finetune_module.evaluation import class_labels
from finetune_module.model import model_recipe__full
from finetune_module.tiny_model import main as build_tiny_model
from finetune_module.tokenization import tokenizer__base
from tests.conftest import EXAMPLE_DATA, REPO, TINY, read_json

VALID_CONFIGS_FILE = REPO / "finetune_module" / "valid_configs.jsonl"  # shipped with the package
VALID_CONFIGS = {
    entry["name"]: entry for entry in map(json.loads, VALID_CONFIGS_FILE.read_text().splitlines())
}
N_TRAIN, N_VALIDATION, N_HOLD_OUT = split_sizes(len(read_json(EXAMPLE_DATA)), 0.95, 0.8)
LABELS = ("billing", "bug", "setup")
PROMPT = "Question: {input}\nAnswer:"
CONTEXT_PROMPT = "Context: {context} Question: {input}"
EXTRA_OUTPUTS = (
    "finetuned_hold_out_metrics",
    "confusion_matrix",
    "prompt_texts",
    "tokenized_validation",
)
FAST = {
    "input_text_key": "question",
    "output_text_key": "reply",
    "max_steps": 2,
    "max_new_tokens": 6,
}


def _driver(config: dict[str, Any]) -> driver.Driver:
    return driver.Builder().with_config(config).with_modules(*finetune_module.MODULES).build()


def _tiny(path: Path, arch: str) -> Path:
    """Builds a tiny model of `arch` with the module's own command (in process)."""
    sizes = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    assert build_tiny_model([str(path), "--arch", arch, "--data", str(EXAMPLE_DATA), *sizes]) == 0
    return path


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def label_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example questions, each with one of three labels as its target (JSON Lines)."""
    path = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    records = [
        {"question": r["question"], "label": LABELS[i % len(LABELS)]}
        for i, r in enumerate(read_json(EXAMPLE_DATA))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _context(index: int, record: dict[str, str]) -> str | list[str]:
    """A record's context documents: a list of texts, or one text for every other record."""
    return [f"Note {index}.", record["reply"][:30]] if index % 2 else f"Note {index}."


@pytest.fixture(scope="module")
def context_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example data with a `docs` context in each record."""
    path = tmp_path_factory.mktemp("context") / "context.json"
    records = [{**r, "docs": _context(i, r)} for i, r in enumerate(read_json(EXAMPLE_DATA))]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def config_run(
    tiny_model_dir: Path,
    tiny_gpt2_dir: Path,
    tiny_llama_dir: Path,
    label_data: Path,
    context_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], dict[str, Any]]:
    """Runs (once) the config of valid_configs.jsonl with the given name on a tiny model; a
    presaved config evaluates what the named base config saved."""
    labels = {"data_path": str(label_data), "output_text_key": "label"}
    context = {"data_path": str(context_data), "context_key": "docs"}
    recipes: dict[str, tuple[str | None, dict[str, Any]]] = {
        "default": (None, {"model_id": str(tiny_model_dir), **labels}),
        "seq2seq": (
            None,
            {"model_id": str(tiny_model_dir), "prompt_template": CONTEXT_PROMPT, **context},
        ),
        "seq2seq_full": (None, {"model_id": str(tiny_model_dir), "max_steps": 3, **labels}),
        "causal": (
            None,
            {
                "model_id": str(tiny_gpt2_dir),
                "data_path": str(EXAMPLE_DATA),
                "prompt_template": PROMPT,
                "max_steps": 8,
                "learning_rate": 5e-3,
                "extra_training_args": {"logging_steps": 1},
            },
        ),
        "causal_full": (
            None,
            {"model_id": str(tiny_llama_dir), "prompt_template": CONTEXT_PROMPT, **context},
        ),
        "presaved": ("seq2seq_full", {}),
        "seq2seq_presaved": ("default", {}),
        "causal_presaved": ("causal", {}),
    }
    runs: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in runs:
            base, inputs = recipes[name]
            if base is None:
                output_dir = tmp_path_factory.mktemp(name)
                inputs = {**FAST, "output_dir": str(output_dir), **inputs}
            else:
                inputs = get(base)["inputs"]
            outputs = [*finetune_module.DEFAULT_OUTPUTS, *EXTRA_OUTPUTS]
            result = _driver(VALID_CONFIGS[name]["config"]).execute(outputs, inputs=inputs)
            runs[name] = {"inputs": inputs, "result": result, "base": base}
        return runs[name]

    return get


# --- valid_configs.jsonl ---------------------------------------------------------------------


def test_valid_configs_cover_every_variant_once() -> None:
    kinds = set()
    for entry in VALID_CONFIGS.values():
        assert set(entry) == {"name", "description", "config"} and entry["description"]
        config = entry["config"]
        assert set(config) <= set(finetune_module.CONFIG_KEYS)
        assert config["start"] in finetune_module.STARTS
        assert config.get("model_type", "seq2seq") in finetune_module.MODEL_TYPES
        use_lora = config.get("use_lora", True) if config["start"] == "base" else None
        kinds.add((config["start"], config.get("model_type", "seq2seq"), use_lora))
    assert kinds == {
        *{("base", model_type, lora) for model_type in ("seq2seq", "causal") for lora in (1, 0)},
        ("presaved", "seq2seq", None),
        ("presaved", "causal", None),
    }


@pytest.mark.parametrize("name", list(VALID_CONFIGS))
def test_valid_config_builds_a_driver_that_needs_only_the_documented_inputs(name: str) -> None:
    dr = finetune_module.build_driver(**VALID_CONFIGS[name]["config"])  # the checked builder
    # raises if any node of the four outputs lacks an upstream node or a required input
    dr.validate_execution(
        list(finetune_module.DEFAULT_OUTPUTS),
        inputs={"data_path": "d.json", "input_text_key": "q", "output_text_key": "a"},
    )
    upstream = {node.name for node in dr.what_is_upstream_of("save_best_models")}
    is_base = VALID_CONFIGS[name]["config"]["start"] == "base"
    assert ("fitted_weights" in upstream) == is_base
    full = VALID_CONFIGS[name]["config"].get("use_lora") is False
    assert ("lora_config" in upstream) == (is_base and not full)


@pytest.mark.parametrize("name", list(VALID_CONFIGS))
def test_valid_config_runs_end_to_end(
    name: str, config_run: Callable[[str], dict[str, Any]]
) -> None:
    run_ = config_run(name)
    result = run_["result"]
    validation = result["finetuned_model_on_validation_set"]
    assert len(validation["validation_predictions"]) == N_VALIDATION
    assert all(isinstance(p, str) for p in validation["validation_predictions"])
    assert len(result["hold_out_set_predictions"]) == N_HOLD_OUT
    metrics = result["training_and_validation_set_metrics"]
    assert math.isfinite(metrics["eval_loss"])
    assert all(0.0 <= metrics[key] <= 100.0 for key in ("rouge1", "rouge2", "rougeL"))
    saved = Path(result["save_best_models"])
    assert read_json(saved / "metrics.json")["hold_out"] == result["finetuned_hold_out_metrics"]
    if run_["base"]:  # a saved fine-tune gives the greedy answers of the run that saved it
        base = config_run(run_["base"])["result"]
        assert result["hold_out_set_predictions"] == base["hold_out_set_predictions"]
        assert (
            result["finetuned_model_on_validation_set"]
            == (base["finetuned_model_on_validation_set"])
        )
        base_loss = base["training_and_validation_set_metrics"]["eval_loss"]
        assert metrics["eval_loss"] == pytest.approx(base_loss, rel=1e-5)
    else:
        assert metrics["global_step"] == run_["inputs"]["max_steps"]
        assert metrics["eval_loss"] == pytest.approx(metrics["best_eval_loss"], rel=1e-4)


# --- decoder-only models -----------------------------------------------------------------------


def test_causal_run_trains_a_lora_adapter_on_the_answers(
    config_run: Callable[[str], dict[str, Any]], tiny_gpt2_dir: Path
) -> None:
    result = config_run("causal")["result"]
    saved = Path(result["save_best_models"])
    adapter = read_json(saved / "adapter_config.json")
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["target_modules"] == ["c_attn"]
    assert adapter["fan_in_fan_out"] is True  # GPT-2's Conv1D stores weights transposed
    assert adapter["base_model_name_or_path"] == str(tiny_gpt2_dir)
    weights = load_file(str(saved / "adapter_model.safetensors"))
    assert weights and all("lora_" in key for key in weights)
    checkpoint = Path(result["training_and_validation_set_metrics"]["best_model_checkpoint"])
    history = read_json(checkpoint / "trainer_state.json")["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])


def test_causal_examples_are_the_prompt_then_the_answer_with_its_end_token(
    config_run: Callable[[str], dict[str, Any]], tiny_gpt2_dir: Path
) -> None:
    result = config_run("causal")["result"]
    tokenizer = tokenizer__base(ModelSettings(str(tiny_gpt2_dir)))
    eos = tokenizer.eos_token_id
    questions = read_json(EXAMPLE_DATA)
    assert result["prompt_texts"] == [PROMPT.format(input=r["question"]) for r in questions]
    for example, reference in zip(
        result["tokenized_validation"],
        result["finetuned_model_on_validation_set"]["validation_references"],
        strict=True,
    ):
        # the answer's own tokens (no beginning-of-sequence token), then the end token
        answer = [*tokenizer(reference, add_special_tokens=False)["input_ids"], eos]
        labels = example["labels"]
        assert labels in (answer, [*answer[: len(labels) - 1], eos])
        # a long prompt is cut in its middle: it still ends where the answer starts
        assert tokenizer.decode(example["input_ids"]).endswith("Answer:")


def test_collator_joins_prompt_and_answer_and_leaves_the_prompt_out_of_the_loss() -> None:
    collator = PromptAnswerCollator(pad_token_id=0)
    batch = collator(
        [{"input_ids": [5, 6, 7], "labels": [8, 9]}, {"input_ids": [5], "labels": [4]}]
    )
    ignore = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [ignore, ignore, ignore, 8, 9],
        [ignore, 4, ignore, ignore, ignore],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    padded = PromptAnswerCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [5], "labels": [4]}]
    )
    assert padded["input_ids"].shape == (1, 8)


def test_prompt_truncation_keeps_the_first_token_and_the_end() -> None:
    assert truncate_middle([1, 2, 3, 4, 5, 6], 4) == [1, 4, 5, 6]
    assert truncate_middle([1, 2], 4) == [1, 2]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_gpt2_dir: Path) -> None:
    tokenizer = tokenizer__base(ModelSettings(str(tiny_gpt2_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).eval()
    questions = [r["question"] for r in read_json(EXAMPLE_DATA)[:6]]
    examples = [{"input_ids": ids} for ids in tokenizer(questions)["input_ids"]]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # the batch needs padding
    settings = {"max_new_tokens": 6, "num_beams": 1}
    batched = generate(model, tokenizer, examples, batch_size=6, **settings)
    one_by_one = generate(model, tokenizer, examples, batch_size=1, **settings)
    assert batched == one_by_one
    assert any(batched)  # the answers are the new tokens only, not the prompt repeated
    pairs = zip(questions, batched, strict=True)
    assert not any(question[:20] in answer for question, answer in pairs)


def test_a_model_of_the_other_kind_is_refused_with_the_model_type_to_set(
    tiny_gpt2_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    inputs = {**FAST, "data_path": str(EXAMPLE_DATA), "output_dir": str(tmp_path)}
    outputs = list(finetune_module.DEFAULT_OUTPUTS)
    with pytest.raises(SettingsError, match='model_type to "causal" for decoder-only'):
        _driver({"start": "base"}).execute(
            outputs, inputs={**inputs, "model_id": str(tiny_gpt2_dir)}
        )
    with pytest.raises(SettingsError, match="cannot be loaded with AutoModelForCausalLM"):
        _driver({"start": "base", "model_type": "causal"}).execute(
            outputs, inputs={**inputs, "model_id": str(tiny_model_dir)}
        )
    with pytest.raises(SettingsError, match="model_type must be one of seq2seq, causal; got 'gpt'"):
        _driver({"start": "base", "model_type": "gpt"}).execute(
            outputs, inputs={**inputs, "model_id": str(tiny_model_dir)}
        )
    with pytest.raises(ValueError, match="Expected use_lora:<class 'bool'> got no"):
        _driver({"start": "base", "use_lora": "no"}).execute(
            outputs, inputs={**inputs, "model_id": str(tiny_model_dir)}
        )
    assert not (tmp_path / "best_model").exists()


# --- full fine-tuning ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seq2seq_full", "causal_full"])
def test_full_finetune_trains_every_weight_and_saves_a_full_model(
    name: str, config_run: Callable[[str], dict[str, Any]]
) -> None:
    run_ = config_run(name)
    saved = Path(run_["result"]["save_best_models"])
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith("adapter_") for name in names)
    before = load_file(str(Path(run_["inputs"]["model_id"]) / "model.safetensors"))
    after = load_file(str(saved / "model.safetensors"))
    assert set(after) == set(before)
    unchanged = [key for key in before if torch.equal(before[key], after[key])]
    assert not unchanged, f"weights that did not train: {unchanged}"


def test_full_finetune_refuses_a_quantized_base_and_trains_every_weight(
    tiny_model_dir: Path,
) -> None:
    quantized = ModelSettings(str(tiny_model_dir), quantization="4bit")
    with pytest.raises(SettingsError, match=r"full fine-tuning \(use_lora False\) trains every"):
        model_recipe__full(quantized)
    recipe = model_recipe__full(ModelSettings(str(tiny_model_dir)))
    assert recipe.lora is None and recipe.adapter_path is None
    model = build_model(recipe, torch.device("cpu"), trainable=True)
    assert all(parameter.requires_grad for parameter in model.parameters())


# --- prompt templates and context ------------------------------------------------------------

RECORDS = [
    {"q": "What is LoRA?", "a": "x", "docs": ["Low-rank updates.", "Few weights."], "t": "LoRA"},
    {"q": "Is a GPU needed?", "a": "y", "docs": "No.", "t": "GPU"},
]


def _prompts(**settings: Any) -> list[str]:
    return prompt_texts(qa_table(RECORDS, "d.json", "q", "a"), RECORDS, "d.json", **settings)


def test_default_template_leaves_the_inputs_unchanged() -> None:
    assert _prompts() == ["What is LoRA?", "Is a GPU needed?"]


def test_template_fills_in_the_input_and_the_context_documents() -> None:
    assert _prompts(prompt_template="C: {context}\nQ: {input}\nA:", context_key="docs") == [
        "C: Low-rank updates.\nFew weights.\nQ: What is LoRA?\nA:",
        "C: No.\nQ: Is a GPU needed?\nA:",
    ]
    assert _prompts(prompt_template="{{{context}}} {input}", context_key=["t", "docs"]) == [
        "{LoRA\nLow-rank updates.\nFew weights.} What is LoRA?",
        "{GPU\nNo.} Is a GPU needed?",
    ]


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (
            {"prompt_template": "{input} {question}"},
            SettingsError,
            r"unknown placeholders: \{question\}",
        ),
        (
            {"prompt_template": "{input} {}"},
            SettingsError,
            r"unknown placeholders: \{\}; it may use",
        ),
        ({"prompt_template": "Answer:"}, SettingsError, r"must contain \{input\}"),
        ({"prompt_template": "{input"}, SettingsError, "is not a valid template"),
        ({"prompt_template": "{context} {input}"}, SettingsError, "set context_key"),
        ({"context_key": "docs"}, SettingsError, r"has no \{context\} placeholder"),
        (
            {"prompt_template": "{context} {input}", "context_key": "nope"},
            DataError,
            "no record has the key 'nope'; keys found: 'q', 'a', 'docs', 't'",
        ),
    ],
)
def test_bad_templates_and_context_keys_are_refused(
    settings: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _prompts(**settings)


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        (3, "record 1, key 'docs': expected text or a list of texts, found 3"),
        (["ok", None], r"record 1, key 'docs': expected text or a list of texts, found \[\"ok\""),
        (..., "record 1 has no key 'docs'"),
    ],
)
def test_bad_context_values_name_the_record_and_the_key(docs: Any, message: str) -> None:
    records = [RECORDS[0], {k: v for k, v in RECORDS[1].items() if k != "docs"}]
    if docs is not ...:
        records[1]["docs"] = docs
    table = qa_table(records, "d.json", "q", "a")
    with pytest.raises(DataError, match=f"d.json: {message}"):
        prompt_texts(table, records, "d.json", "{context} {input}", "docs")


def test_templated_prompts_are_what_the_model_is_given(
    config_run: Callable[[str], dict[str, Any]], tiny_model_dir: Path
) -> None:
    run_ = config_run("seq2seq")
    records = read_json(Path(run_["inputs"]["data_path"]))
    prompts = run_["result"]["prompt_texts"]
    assert prompts[1] == CONTEXT_PROMPT.format(
        context="\n".join(records[1]["docs"]), input=records[1]["question"]
    )
    assert prompts[2] == CONTEXT_PROMPT.format(context="Note 2.", input=records[2]["question"])
    tokenizer = tokenizer__base(ModelSettings(str(tiny_model_dir)))
    references = run_["result"]["finetuned_model_on_validation_set"]["validation_references"]
    by_reply = {r["reply"]: i for i, r in enumerate(records)}
    for example, reference in zip(run_["result"]["tokenized_validation"], references, strict=True):
        ids = tokenizer(prompts[by_reply[reference]])["input_ids"]
        assert example["input_ids"] in (ids, ids[: len(example["input_ids"]) - 1] + ids[-1:])


def test_a_bad_template_is_refused_before_any_model_is_loaded(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    with pytest.raises(SettingsError, match=r"unknown placeholders: \{question\}"):
        _driver({"start": "base"}).execute(
            list(finetune_module.DEFAULT_OUTPUTS),
            inputs={
                **FAST,
                "data_path": str(EXAMPLE_DATA),
                "output_dir": str(tmp_path),
                "model_id": str(tiny_model_dir),
                "prompt_template": "{question}",
            },
        )
    assert not list(tmp_path.iterdir())


# --- class-label targets -----------------------------------------------------------------------


def _table(targets: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"input_text": ["q"] * len(targets), "output_text": targets})


def test_class_labels_are_found_in_targets_that_look_like_labels() -> None:
    labels = ["yes", "no", "yes", " no", "maybe", "maybe"]
    assert class_labels(_table(labels), EvaluationSettings()) == ["maybe", "no", "yes"]
    assert labels_of(labels, task="generation") == []
    assert labels_of([*labels, "unsure"]) == []  # a label seen once: free text
    assert labels_of([*labels, "unsure"], task="classification") == [
        "maybe",
        "no",
        "unsure",
        "yes",
    ]
    many = [f"label {i}" for i in range(21)] * 2
    assert labels_of(many) == []  # more than 20 distinct targets
    with pytest.raises(SettingsError, match="task must be one of auto, classification, generation"):
        EvaluationSettings(task="classify")


def test_accuracy_macro_f1_and_confusion_matrix_of_label_answers() -> None:
    predictions = ["yes", "no ", "no", "maybe"]
    references = ["yes", "no", "yes", "no"]
    metrics = text_metrics(predictions, references, ["no", "yes"])
    # "no": precision 1/2, recall 1/2 -> F1 1/2; "yes": precision 1, recall 1/2 -> F1 2/3
    assert metrics["accuracy"] == 50.0
    assert metrics["macro_f1"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2, abs=1e-3)
    assert {"rouge1", "rougeL"} <= set(metrics)
    assert "accuracy" not in text_metrics(predictions, references, [])
    matrix = confusion_counts(predictions, references, ["no", "yes"])
    assert list(matrix.index) == ["no", "yes"] and list(matrix.columns) == [
        "no",
        "yes",
        OTHER_LABEL,
    ]
    assert matrix.loc["no"].tolist() == [1, 0, 1] and matrix.loc["yes"].tolist() == [1, 1, 0]
    assert confusion_counts(predictions, references, []).empty


def test_macro_f1_counts_every_label_and_a_label_never_seen_as_0() -> None:
    expected = ["a", "a", "b", "x"]  # "x" is no label: its answer "a" is a false positive
    predicted = ["a", "b", "b", "a"]
    # "a": TP 1, FP 1, FN 1 -> 1/2; "b": TP 1, FP 1 -> 2/3; "c": never seen -> 0
    assert macro_f1(expected, predicted, ["a", "b", "c"]) == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert macro_f1(expected, predicted, ["a"]) == 0.5
    assert macro_f1(["a"], ["a"], []) == 0.0
    # no reference among the labels: a row of zeros for each label, not an error
    matrix = confusion_counts(["a", "zzz"], ["x", "y"], ["a", "b"])
    assert matrix.values.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_label_metrics_equal_scikit_learns() -> None:
    # scikit-learn comes with the sweep extra (the test environment has it), not the core install
    sk = pytest.importorskip("sklearn.metrics")
    draw = random.Random(0)
    for _ in range(2000):
        size = draw.randint(1, 12)
        references = [draw.choice("abcdx") for _ in range(size)]
        predictions = [draw.choice("abcdx") for _ in range(size)]
        labels = sorted(draw.sample("abcd", draw.randint(1, 4)))
        expected = sk.f1_score(
            references, predictions, labels=labels, average="macro", zero_division=0
        )
        assert macro_f1(references, predictions, labels) == pytest.approx(expected, abs=1e-12)
        if set(references) & set(labels):  # else scikit-learn refuses; ours is all zeros
            answers = [p if p in labels else OTHER_LABEL for p in predictions]
            counts = sk.confusion_matrix(references, answers, labels=[*labels, OTHER_LABEL])
            matrix = confusion_counts(predictions, references, labels)
            assert matrix.values.tolist() == counts[: len(labels)].tolist()


@pytest.mark.parametrize("name", ["default", "seq2seq_presaved"])
def test_label_targets_get_accuracy_macro_f1_and_a_confusion_matrix(
    name: str, config_run: Callable[[str], dict[str, Any]]
) -> None:
    result = config_run(name)["result"]
    for metrics in (
        result["training_and_validation_set_metrics"],
        result["finetuned_hold_out_metrics"],
    ):
        assert 0.0 <= metrics["accuracy"] <= 100.0 and 0.0 <= metrics["macro_f1"] <= 100.0
    saved = read_json(Path(result["save_best_models"]) / "metrics.json")
    assert "macro_f1" in saved["hold_out"]
    matrix = result["confusion_matrix"]
    assert list(matrix.index) == list(LABELS)
    assert list(matrix.columns) == [*LABELS, OTHER_LABEL]
    assert int(matrix.to_numpy().sum()) == N_HOLD_OUT


def test_free_text_targets_get_no_classification_metrics(
    config_run: Callable[[str], dict[str, Any]],
) -> None:
    result = config_run("causal")["result"]
    assert "accuracy" not in result["training_and_validation_set_metrics"]
    assert result["confusion_matrix"].empty


# --- the command line --------------------------------------------------------------------------


def test_cli_switches_reach_the_dataflow(
    tiny_gpt2_dir: Path, label_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run.main(
        [
            *("--data", str(label_data), "--output-key", "label"),
            *("--model-id", str(tiny_gpt2_dir), "--model-type", "causal", "--full-finetune"),
            *("--prompt-template", r"Q: {input}\nLabel:", "--task", "classification"),
            *("--output-dir", str(tmp_path), "--max_steps", "1", "--max-new-tokens", "3"),
        ]
    )
    assert status == 0
    saved = tmp_path / "best_model"
    assert (saved / "model.safetensors").exists() and not (saved / "adapter_config.json").exists()
    assert "macro_f1" in read_json(saved / "metrics.json")["hold_out"]
    assert "accuracy" in capsys.readouterr().out


# --- base model vs fine-tune, report, predict across the kinds ----------------------------------


@pytest.mark.parametrize("name", list(VALID_CONFIGS))
def test_lora_runs_compare_with_the_base_model_and_every_run_writes_a_report(
    name: str, config_run: Callable[[str], dict[str, Any]]
) -> None:
    run_ = config_run(name)
    metrics = run_["result"]["training_and_validation_set_metrics"]
    # a full fine-tune trained the base weights in place: no adapter to switch off
    full = VALID_CONFIGS[run_["base"] or name]["config"].get("use_lora") is False
    assert ("base_rougeL" in metrics) == (not full)
    assert ("rougeL_gain" in metrics) == (not full)
    saved = Path(run_["result"]["save_best_models"])
    page = (saved / "report.html").read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>") and ("<td>n/a</td>" in page) == full
    if "accuracy" in metrics and not full:  # class labels: the base model is scored alike
        assert metrics["accuracy_gain"] == pytest.approx(
            metrics["accuracy"] - metrics["base_accuracy"]
        )


def test_predict_gives_the_causal_runs_answers_through_its_prompt_template(
    config_run: Callable[[str], dict[str, Any]],
) -> None:
    result = config_run("causal")["result"]
    saved = Path(result["save_best_models"])
    assert read_json(saved / "finetune_settings.json")["prompt_template"] == PROMPT
    questions = [question for question, _, _ in result["hold_out_set_predictions"]]
    answers = [answer for _, answer, _ in result["hold_out_set_predictions"]]
    assert finetune_module.predict(str(saved), questions) == answers
