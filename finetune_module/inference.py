"""Using a saved fine-tune outside the dataflow: answer questions, export a merged model.

```python
import finetune_module

answers = finetune_module.predict("finetuned-model/best_model", ["How do I reset my password?"])
finetune_module.export_merged("finetuned-model/best_model", "finetuned-model/merged")
```

This is not a stage of the dataflow (it is not in MODULES): it reuses the dataflow's loading,
truncation and generation helpers, so that greedy answers equal those of the run that saved the
model.
"""

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from finetune_module.artifacts import SETTINGS_FILE, _atomic_directory
from finetune_module.data import (
    DEFAULT_PROMPT_TEMPLATE,
    _check_key_exists,
    _read_text,
    raw_records__file,
)
from finetune_module.errors import DataError, ModelNotAvailableError, SettingsError
from finetune_module.evaluation import _generate, generation_settings
from finetune_module.loading import ADAPTER_CONFIG, load_pretrained, saved_adapter_dir
from finetune_module.model import (
    MODEL_CONFIG_FILE,
    LanguageModel,
    _adapter_base_model_id,
    _is_adapter_dir,
    _load_adapter,
    _load_model,
    device,
)
from finetune_module.tokenization import _truncate, _truncate_start, _with_pad_token

#: The answer length bound of a model saved without finetune_settings.json (a checkpoint).
DEFAULT_MAX_NEW_TOKENS = 128
RECORD_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")  # read as records


def _load(model_id: str, on: torch.device, trust_remote_code: bool) -> LanguageModel:
    """The model in `model_id` in fp32: sequence-to-sequence or decoder-only, as its config says."""
    config = load_pretrained(
        AutoConfig.from_pretrained, model_id, trust_remote_code=trust_remote_code
    )
    kind = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return _load_model(kind, model_id, on, trust_remote_code, None)


def _load_saved(
    model_dir: str, on: torch.device, trust_remote_code: bool
) -> tuple[LanguageModel, PreTrainedTokenizerBase]:
    """The saved model in eval mode and its tokenizer: a LoRA adapter on its base model (a
    directory with adapter_config.json) or a full model (config.json: a full fine-tune or an
    export)."""
    if _is_adapter_dir(model_dir):
        adapter_dir = saved_adapter_dir(model_dir, "model_dir")
        base = _load(_adapter_base_model_id(adapter_dir), on, trust_remote_code)
        model = _load_adapter(base, adapter_dir, is_trainable=False)
    elif os.path.isfile(os.path.join(model_dir, MODEL_CONFIG_FILE)):
        model = _load(model_dir, on, trust_remote_code)
    else:
        raise ModelNotAvailableError(
            f"No saved fine-tune in {model_dir!r}: expected {ADAPTER_CONFIG} (a LoRA adapter "
            f"saved by a run) or {MODEL_CONFIG_FILE} (a full model or an export)."
        )
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained, model_dir, trust_remote_code=trust_remote_code
    )
    return model.eval(), _with_pad_token(tokenizer)


def _saved_settings(model_dir: str) -> dict[str, Any]:
    """The length caps and generation settings saved with the model ({} when there are none)."""
    path = os.path.join(model_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def predict(
    model_dir: str,
    texts: Sequence[str],
    *,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    trust_remote_code: bool = False,
    quiet: bool = True,
) -> list[str]:
    """The saved fine-tune's answers to `texts`, in order: batched, greedy unless `num_beams` > 1.

    Each text is put in the prompt template and truncated to the input cap saved in the model's
    finetune_settings.json, and answers stop at its length bound, as in the run that saved it.
    (A template with `{context}` is refused: predict takes questions only.)

    :param model_dir: a `best_model/` directory, a Trainer `checkpoint-N/` or an exported model.
    :param texts: the questions.
    :param num_beams: 1 for greedy decoding (default), more for beam search.
    :param max_new_tokens: the most tokens an answer may have (default: the saved bound).
    :param batch_size: questions answered at once (default: the saved one, else 32).
    :param trust_remote_code: allow code shipped with the model to run.
    :param quiet: no progress bar.
    """
    if isinstance(texts, str):
        raise SettingsError("texts must be a list of strings, got one string; wrap it in a list.")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"texts[{index}] is a {type(text).__name__}, expected text.")
    model_dir = os.path.abspath(model_dir)
    saved = _saved_settings(model_dir)
    settings = generation_settings(
        target_length_cap=saved.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        generation_batch_size=batch_size or saved.get("batch_size", 32),
    )
    if not texts:
        return []
    model, tokenizer = _load_saved(model_dir, device(), trust_remote_code)
    template = saved.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    if "{context}" in template:
        raise SettingsError(
            f"The model was trained with the prompt template {template!r}, which needs a "
            "context for each question; predict takes questions only."
        )
    prompts = [template.format(input=text) for text in texts]
    cap = saved.get("source_length_cap")
    cut = _truncate if model.config.is_encoder_decoder else _truncate_start
    examples = [
        {"input_ids": cut(ids, cap) if cap else ids} for ids in tokenizer(prompts)["input_ids"]
    ]
    return _generate(model, tokenizer, examples, **settings, desc="predicting", quiet=quiet)


def read_texts(path: str, input_text_key: str = "question") -> list[str]:
    """The questions in a file: records holding `input_text_key` in a `.json` list (or of plain
    strings), `.jsonl` lines, or a `.csv`/`.tsv`/`.parquet` table, read as the training data is;
    any other file holds one question per line.

    :param path: the file.
    :param input_text_key: the key of the question in each record.
    """
    if not path.lower().endswith(RECORD_SUFFIXES):
        texts = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    else:
        records = raw_records__file(path)
        if any(isinstance(record, dict) for record in records):
            _check_key_exists(records, input_text_key, path)
        texts = []
        for index, record in enumerate(records):
            if isinstance(record, dict):
                if input_text_key not in record:
                    raise DataError(f"{path}: record {index} has no key {input_text_key!r}.")
                record = record[input_text_key]
            if not isinstance(record, str):
                raise DataError(
                    f"{path}: record {index}, key {input_text_key!r}: expected text, "
                    f"found {type(record).__name__}."
                )
            texts.append(record)
    if not texts:
        raise DataError(f"{path}: holds no questions.")
    return texts


def export_merged(model_dir: str, export_dir: str, *, trust_remote_code: bool = False) -> str:
    """Merges the saved LoRA adapter into its base model and saves the result to `export_dir`
    as a plain model (safetensors) with its tokenizer and finetune_settings.json: loadable with
    `AutoModelForSeq2SeqLM.from_pretrained(export_dir)` (`AutoModelForCausalLM` for a
    decoder-only model), no peft needed. Returns `export_dir`.

    The directory is written atomically (a temporary directory renamed into place).

    :param model_dir: the saved adapter (`best_model/` or a Trainer `checkpoint-N/`).
    :param export_dir: where the merged model goes (replaced if it exists).
    :param trust_remote_code: allow code shipped with the model to run.
    """
    source, target = os.path.abspath(model_dir), os.path.abspath(export_dir)
    if not _is_adapter_dir(source):
        raise ModelNotAvailableError(
            f"No LoRA adapter in {source!r} (no {ADAPTER_CONFIG}); export merges an adapter "
            "saved by a run into its base model."
        )
    if source == target or source.startswith(target + os.sep):
        raise SettingsError(
            f"The export directory {target!r} would replace the adapter it is made from; "
            "choose another directory."
        )
    model, tokenizer = _load_saved(source, torch.device("cpu"), trust_remote_code)
    merged = model.merge_and_unload()
    with _atomic_directory(target) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        settings = os.path.join(source, SETTINGS_FILE)
        if os.path.isfile(settings):
            shutil.copy2(settings, staging)
    return target
