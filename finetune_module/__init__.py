"""finetune_module: fine-tune a sequence-to-sequence model with LoRA, as a Hamilton dataflow.

The driver config chooses the variant: "start" ("base" trains, "presaved" evaluates a saved
fine-tune), "model_type" ("seq2seq", the default, or "causal" for decoder-only models) and
"use_lora" (True, the default, or False for full fine-tuning); `valid_configs.jsonl` lists them.

```python
from hamilton import driver
import finetune_module

dr = driver.Builder().with_config({"start": "base"}).with_modules(*finetune_module.MODULES).build()
result = dr.execute(
    ["save_best_models", "hold_out_set_predictions",
     "training_and_validation_set_metrics", "finetuned_model_on_validation_set"],
    inputs={"data_path": "example-support-dataset.json",
            "input_text_key": "question", "output_text_key": "reply"},
)
answers = finetune_module.predict(result["save_best_models"], ["How do I reset my password?"])
finetune_module.export_merged(result["save_best_models"], "merged-model")  # no peft needed
```
`finetune_module.build_driver("base")` builds the same driver, refusing an unknown start or
config key.
"""

from collections.abc import Sequence
from typing import Any

from hamilton import driver

from finetune_module import artifacts, data, evaluation, model, report, tokenization, training
from finetune_module.data import SOURCES
from finetune_module.errors import (
    DataError,
    FinetuneInputError,
    ModelNotAvailableError,
    SettingsError,
    mask_credentials,
)
from finetune_module.evaluation import TASKS
from finetune_module.inference import export_merged, predict, read_texts
from finetune_module.model import MODEL_TYPES

#: The Hamilton modules of the dataflow, in execution order.
MODULES = (data, tokenization, model, training, evaluation, report, artifacts)

#: The outputs a full run asks for.
DEFAULT_OUTPUTS = (
    "save_best_models",
    "hold_out_set_predictions",
    "training_and_validation_set_metrics",
    "finetuned_model_on_validation_set",
)

#: The valid values of the driver config's "start".
STARTS = ("base", "presaved")

#: The keys of the driver config (the rest of the settings are inputs).
CONFIG_KEYS = ("start", "source", "model_type", "use_lora")


def build_driver(
    start: str = "base",
    *,
    cache: str | None = None,
    adapters: Sequence[Any] = (),
    **config: Any,
) -> driver.Driver:
    """The dataflow's Hamilton driver for `start` ("base": fine-tune, "presaved": evaluate a
    saved fine-tune) and the other config keys (`source`, `model_type`, `use_lora`): the same as
    `driver.Builder().with_config({"start": start, **config}).with_modules(*MODULES).build()`,
    with a clear error for an unknown start, source or config key.

    :param cache: a directory for Hamilton's cache (`.with_cache(cache)`): a re-run with the same
        data, model and training settings re-uses the tokenized data and the trained weights.
    :param adapters: more driver adapters, e.g. `finetune_module.tracking.mlflow_tracker()`.
    """
    if start not in STARTS:
        raise SettingsError(f"start must be one of {', '.join(STARTS)}; got {start!r}.")
    if config.get("source", "file") not in SOURCES:
        raise SettingsError(
            f"source must be one of {', '.join(SOURCES)}; got {config['source']!r}."
        )
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise SettingsError(
            f"Unknown driver config keys: {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}."
        )
    builder = driver.Builder().with_config({"start": start, **config}).with_modules(*MODULES)
    if cache:
        builder = builder.with_cache(cache, log_to_file=True)
    if adapters:
        builder = builder.with_adapters(*adapters)
    return builder.build()


__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_OUTPUTS",
    "MODEL_TYPES",
    "MODULES",
    "SOURCES",
    "STARTS",
    "TASKS",
    "DataError",
    "FinetuneInputError",
    "ModelNotAvailableError",
    "SettingsError",
    "build_driver",
    "export_merged",
    "mask_credentials",
    "predict",
    "read_texts",
]
