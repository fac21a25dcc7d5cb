"""finetune_module: fine-tune a language model with LoRA (or fully), as a Hamilton dataflow.

The driver config chooses the variant: "start" ("base" trains, "presaved" evaluates a saved
fine-tune), "model_type" ("seq2seq", the default, or "causal" for decoder-only models),
"use_lora" (True, the default, or False for full fine-tuning) and "source" ("file", the
default, or "sql"); `valid_configs.jsonl` lists them.

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
config key; `finetune_module.draw_dag(dr, "dag.png")` draws it, one box per stage.

The package has two kinds of code: the stage modules that `MODULES` lists (Hamilton nodes, in
execution order) and the engine they call (`finetune_module.engine`: plain functions and
classes, usable without Hamilton).
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def _the_command_runs() -> bool:
    """Whether this process is the `finetune` command: `python -m finetune_module`, the
    installed `finetune` script, or this checkout's `run.py` (not a user's own run file)."""
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == __name__:
        return True
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c", "-m") else None
    if script is None:
        return False
    return script.name == "finetune" or script.resolve() == Path(__file__).parents[1] / "run.py"


#: Hamilton's environment variable that switches off loading its extensions (for pandas, MLflow,
#: scikit-learn, ...) when it is first imported. The dataflow uses none of them; in the
#: command's own process they are not loaded (1.6-1.7 s of every command's start on this
#: project's machine), unless the variable is set. A program that imports this package keeps
#: Hamilton's default.
HAMILTON_AUTOLOAD = "HAMILTON_AUTOLOAD_EXTENSIONS"
if _the_command_runs() and "hamilton" not in sys.modules:
    os.environ.setdefault(HAMILTON_AUTOLOAD, "0")

from hamilton import driver

from finetune_module import (
    artifacts,
    data,
    deprecated,
    evaluation,
    model,
    pictures,
    report,
    settings,
    timing,
    tokenization,
    training,
)
from finetune_module.data import SOURCES
from finetune_module.engine.settings import MODEL_TYPES, TASKS
from finetune_module.errors import (
    DataError,
    FinetuneInputError,
    ModelNotAvailableError,
    SettingsError,
    StorageError,
    mask_credentials,
)
from finetune_module.inference import export_merged, predict, read_texts
from finetune_module.pictures import STAGE_NAMES
from finetune_module.timing import timing_adapter

#: The package's version (pyproject.toml reads it from here: the one place it is written).
__version__ = "0.1.0"

#: The stage modules of the dataflow, in execution order (the last holds deprecated names).
STAGES = (settings, data, tokenization, model, training, evaluation, report, artifacts)
#: The Hamilton modules of the dataflow: the stages, then the deprecated names.
MODULES = (*STAGES, deprecated)

#: The outputs a full run asks for (the reference module's four).
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
    with a clear error for an unknown start, source or config key, and with a
    `timing_adapter()` (unless `adapters` holds one) so that the report and `run_info.json`
    state each stage's wall time.

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
    if not any(isinstance(adapter, timing.StageTimer) for adapter in adapters):
        adapters = [*adapters, timing_adapter()]
    builder = driver.Builder().with_config({"start": start, **config}).with_modules(*MODULES)
    if cache:
        builder = builder.with_cache(cache, log_to_file=True)
    return builder.with_adapters(*adapters).build()


def draw_dag(dr: driver.Driver, path: str, stage: str | None = None) -> str:
    """Draws the driver's dataflow to `path` (.png, .svg, .pdf or .dot; Graphviz's `dot` draws
    it) and returns the path.

    :param dr: a driver built with `MODULES` (any config; the picture names it).
    :param stage: None (default): an overview, one box per stage with the values that pass
        between stages, the inputs above and the four outputs below; a stage's name
        (`STAGE_NAMES`: "settings", "data", ..., "artifacts"): that stage's nodes in full, with
        what comes in from other stages; "all": every node, grouped by stage.
    """
    return pictures.draw(dr, path, stage, DEFAULT_OUTPUTS)


#: Modules that moved into the engine -> where they are now (their old names still import).
MOVED_MODULES = {
    f"finetune_module.{name}": f"finetune_module.engine.{name}"
    for name in ("batching", "distributed", "loading", "memory", "speedups")
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module's old name (`MOVED_MODULES`) as an alias of the module at its new
    place (every name is looked up there), with a DeprecationWarning."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {MOVED_MODULES[spec.name]}; import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        target = importlib.import_module(MOVED_MODULES[spec.name])
        alias = ModuleType(spec.name, target.__doc__)
        alias.__getattr__ = lambda name: getattr(target, name)  # type: ignore[method-assign]
        alias.__dir__ = lambda: dir(target)  # type: ignore[method-assign]
        return alias

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the alias looks every name up in the module at its new place."""


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_OUTPUTS",
    "MODEL_TYPES",
    "MODULES",
    "MOVED_MODULES",
    "SOURCES",
    "STAGES",
    "STAGE_NAMES",
    "STARTS",
    "TASKS",
    "DataError",
    "FinetuneInputError",
    "ModelNotAvailableError",
    "SettingsError",
    "StorageError",
    "__version__",
    "build_driver",
    "draw_dag",
    "export_merged",
    "mask_credentials",
    "predict",
    "read_texts",
    "timing_adapter",
]
