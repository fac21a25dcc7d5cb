"""finetune_module: fine-tune a sequence-to-sequence model with LoRA, as a Hamilton dataflow.

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
"""

from finetune_module import artifacts, data, evaluation, model, tokenization, training
from finetune_module.errors import (
    DataError,
    FinetuneInputError,
    ModelNotAvailableError,
    SettingsError,
)

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

__all__ = [
    "DEFAULT_OUTPUTS",
    "MODULES",
    "STARTS",
    "DataError",
    "FinetuneInputError",
    "ModelNotAvailableError",
    "SettingsError",
]
