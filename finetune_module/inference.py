"""Using a saved fine-tune outside the dataflow: answer questions, export a merged model.

```python
import finetune_module

answers = finetune_module.predict("finetuned-model/best_model", ["How do I reset my password?"])
finetune_module.export_merged("finetuned-model/best_model", "finetuned-model/merged")
```

This is not a stage of the dataflow (it is not in MODULES): it builds the model from the saved
model's recipe with the engine's one builder, and truncates and generates as the dataflow does,
so that greedy answers equal those of the run that saved the model.
"""

import os
import shutil
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from finetune_module.engine.distributed import process_device
from finetune_module.engine.files import SETTINGS_FILE, atomic_directory, saved_settings
from finetune_module.engine.generation import generate
from finetune_module.engine.loading import ADAPTER_CONFIG, load_pretrained
from finetune_module.engine.models import (
    LanguageModel,
    build_model,
    is_adapter_dir,
    saved_model_dir,
    saved_model_recipe,
)
from finetune_module.engine.quiet import quiet_libraries
from finetune_module.engine.records import DEFAULT_PROMPT_TEMPLATE, check_key_exists
from finetune_module.engine.settings import EvaluationSettings, speedups_requested
from finetune_module.engine.sources import RECORD_FILE_SUFFIXES, read_file_records, read_text
from finetune_module.engine.tokens import (
    input_limit,
    truncate_middle,
    truncate_tail,
    with_pad_token,
)
from finetune_module.errors import DataError, ModelNotAvailableError, SettingsError

#: The answer length bound of a model saved without finetune_settings.json.
DEFAULT_MAX_NEW_TOKENS = 128


def _load_saved(
    model_dir: str, on: torch.device, trust_remote_code: bool
) -> tuple[LanguageModel, PreTrainedTokenizerBase]:
    """The saved model in eval mode and its tokenizer: a LoRA adapter on its base model (a
    directory with adapter_config.json) or a full model (config.json: a full fine-tune or an
    export), built from its recipe with the speed-ups that apply on `on`."""
    recipe = saved_model_recipe(
        model_dir,
        trust_remote_code=trust_remote_code,
        speedups_requested=speedups_requested(on, None),
    )
    model = build_model(recipe, on)
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained, model_dir, trust_remote_code=trust_remote_code
    )
    return model, with_pad_token(tokenizer)


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
    finetune_settings.json, and answers stop at its length bound, as in the run that saved it
    (a best model, a checkpoint and an export all hold that file). A model saved without it is
    capped at its own input limit (`input_limit`), so memory stays bounded for any text. An
    empty text is refused, as training refuses one; so is a template with `{context}`:
    predict takes questions only.

    :param model_dir: a run's output directory (its best model is used), a `best_model/`
        directory, a Trainer `checkpoint-N/` or an exported model.
    :param texts: the questions.
    :param num_beams: 1 for greedy decoding (default), more for beam search.
    :param max_new_tokens: the most tokens an answer may have (default: the saved bound).
    :param batch_size: questions answered at once (default: the saved one, else 32).
    :param trust_remote_code: allow code shipped with the model to run.
    :param quiet: no progress bar, and none of the libraries' own bars, log lines or warnings.
    """
    if isinstance(texts, str):
        raise SettingsError("texts must be a list of strings, got one string; wrap it in a list.")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"texts[{index}] is a {type(text).__name__}, expected text.")
        if not text.strip():
            raise DataError(f"texts[{index}]: empty text.")
    model_dir = saved_model_dir(model_dir)
    saved = saved_settings(model_dir)
    checked = EvaluationSettings(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        generation_batch_size=batch_size or saved.get("batch_size", 32),
    )
    settings = {
        "num_beams": checked.num_beams,
        "max_new_tokens": checked.max_new_tokens
        or saved.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        "batch_size": checked.generation_batch_size,
    }
    if not texts:
        return []
    template = saved.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    if "{context}" in template:  # refused before the model is loaded
        raise SettingsError(
            f"The model was trained with the prompt template {template!r}, which needs a "
            "context for each question; predict takes questions only."
        )
    with quiet_libraries(quiet):
        model, tokenizer = _load_saved(model_dir, process_device(), trust_remote_code)
        prompts = [template.format(input=text) for text in texts]
        cap = saved.get("source_length_cap") or input_limit(model.config, tokenizer)
        cut = truncate_tail if model.config.is_encoder_decoder else truncate_middle
        examples = [{"input_ids": cut(ids, cap)} for ids in tokenizer(prompts)["input_ids"]]
        return generate(model, tokenizer, examples, **settings, desc="predicting", quiet=quiet)


def read_texts(path: str, input_text_key: str = "question") -> list[str]:
    """The questions in a file: records holding `input_text_key` in a `.json` list (or of plain
    strings), `.jsonl` lines, or a `.csv`/`.tsv`/`.parquet` table, read as the training data is;
    any other file holds one question per line.

    :param path: the file.
    :param input_text_key: the key of the question in each record.
    """
    if not path.lower().endswith(RECORD_FILE_SUFFIXES):
        texts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    else:
        records = read_file_records(path)
        if any(isinstance(record, dict) for record in records):
            check_key_exists(records, input_text_key, path)
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


def export_merged(
    model_dir: str, export_dir: str, *, trust_remote_code: bool = False, quiet: bool = False
) -> str:
    """Merges the saved LoRA adapter into its base model and saves the result to `export_dir`
    as a plain model (safetensors) with its tokenizer and finetune_settings.json: loadable with
    `AutoModelForSeq2SeqLM.from_pretrained(export_dir)` (`AutoModelForCausalLM` for a
    decoder-only model), no peft needed. Returns `export_dir`.

    The directory is written atomically (a temporary directory renamed into place).

    :param model_dir: the saved adapter: a run's output directory (its best model is used), a
        `best_model/` directory or a Trainer `checkpoint-N/`.
    :param export_dir: where the merged model goes (replaced if it exists).
    :param trust_remote_code: allow code shipped with the model to run.
    :param quiet: none of the libraries' own progress bars, log lines or warnings.
    """
    source, target = saved_model_dir(model_dir), os.path.abspath(export_dir)
    if not is_adapter_dir(source):
        raise ModelNotAvailableError(
            f"No LoRA adapter in {source!r} (no {ADAPTER_CONFIG}); export merges an adapter "
            "saved by a run into its base model."
        )
    if source == target or source.startswith(target + os.sep):
        raise SettingsError(
            f"The export directory {target!r} would replace the adapter it is made from; "
            "choose another directory."
        )
    with quiet_libraries(quiet):
        model, tokenizer = _load_saved(source, torch.device("cpu"), trust_remote_code)
        merged = model.merge_and_unload()
        with atomic_directory(target) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            settings = os.path.join(source, SETTINGS_FILE)
            if os.path.isfile(settings):
                shutil.copy2(settings, staging)
    return target
