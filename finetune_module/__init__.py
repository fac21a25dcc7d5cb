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
```
`finetune_module.build_driver("base")` builds the same driver, refusing an unknown start or
config key.
"""

from typing import Any

from hamilton import driver

from finetune_module import artifacts, data, evaluation, model, tokenization, training
from finetune_module.errors import (
    DataError,
    FinetuneInputError,
    ModelNotAvailableError,
    SettingsError,
)
from finetune_module.evaluation import TASKS
from finetune_module.model import MODEL_TYPES

#: The Hamilton modules of the dataflow, in execution order.
MODULES = (data, tokenization, model, training, evaluation, artifacts)

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
CONFIG_KEYS = ("start", "model_type", "use_lora")


def build_driver(start: str = "base", **config: Any) -> driver.Driver:
    """The dataflow's Hamilton driver for `start` ("base": fine-tune, "presaved": evaluate a
    saved fine-tune) and the other config keys (`model_type`, `use_lora`): the same as
    `driver.Builder().with_config({"start": start, **config}).with_modules(*MODULES).build()`,
    with a clear error for an unknown start or config key.
    """
    if start not in STARTS:
        raise SettingsError(f"start must be one of {', '.join(STARTS)}; got {start!r}.")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise SettingsError(
            f"Unknown driver config keys: {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}."
        )
    return driver.Builder().with_config({"start": start, **config}).with_modules(*MODULES).build()


__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_OUTPUTS",
    "MODEL_TYPES",
    "MODULES",
    "STARTS",
    "TASKS",
    "DataError",
    "FinetuneInputError",
    "ModelNotAvailableError",
    "SettingsError",
    "build_driver",
]
