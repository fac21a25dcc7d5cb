"""The layout holds: every public name of the first round still works (renamed ones as
deprecated aliases), every setting is checked by one node that the rest depends on, stage
modules hold nodes only, no module reaches into another's private names, and the pictures of
the dataflow draw."""

import ast
import importlib
import inspect
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hamilton import driver

import finetune_module
from finetune_module.deprecated import DEPRECATED_NODES
from finetune_module.engine.models import AUTO_CLASSES
from tests.conftest import EXAMPLE_DATA, QUICK, REPO

CONFIGS = {
    "base": {"start": "base"},
    "full": {"start": "base", "use_lora": False},
    "presaved": {"start": "presaved"},
    "causal": {"start": "base", "model_type": "causal"},
    "sql": {"start": "base", "source": "sql"},
}
# The first round's node and input names (as its drivers listed them), by config.
OLD_COMMON_NODES = [
    "auto_model_class",
    "base_hold_out_set_metrics",
    "base_model",
    "base_model_answers",
    "base_model_on_hold_out_set",
    "base_model_on_validation_set",
    "base_validation_set_metrics",
    "base_vs_finetuned_metrics",
    "best_model_dir",
    "class_labels",
    "confusion_matrix",
    "data_collator",
    "data_label",
    "data_splits",
    "device",
    "evaluation_model",
    "finetuned_model_answers",
    "finetuned_model_on_validation_set",
    "generation_settings",
    "hold_out_set",
    "hold_out_set_metrics",
    "hold_out_set_predictions",
    "mixed_precision",
    "prediction_tables",
    "prompt_texts",
    "qa_table",
    "quantization_config",
    "raw_records",
    "report_html",
    "save_best_models",
    "source_length_cap",
    "source_token_ids",
    "target_length_cap",
    "target_token_ids",
    "tokenized_hold_out",
    "tokenized_train",
    "tokenized_validation",
    "tokenizer",
    "train_set",
    "training_and_validation_set_metrics",
    "training_log",
    "validation_loss",
    "validation_predictions",
    "validation_references",
    "validation_set",
    "validation_set_metrics",
]
OLD_TRAINING_NODES = [
    "fitted_weights",
    "scaling_arguments",
    "trainable_model",
    "training_arguments",
]
OLD_NODES = {
    "base": [*OLD_COMMON_NODES, *OLD_TRAINING_NODES, "lora_config", "peft_model"],
    "full": [*OLD_COMMON_NODES, *OLD_TRAINING_NODES],
    "presaved": [*OLD_COMMON_NODES, "presaved_model", "presaved_model_dir"],
    "causal": [*OLD_COMMON_NODES, *OLD_TRAINING_NODES, "lora_config", "peft_model"],
    "sql": [*OLD_COMMON_NODES, *OLD_TRAINING_NODES, "lora_config", "peft_model"],
}
OLD_COMMON_INPUTS = [
    "bf16",
    "context_key",
    "data_path",
    "fp16",
    "generation_batch_size",
    "input_text_key",
    "length_percentile",
    "load_in_4bit",
    "load_in_8bit",
    "max_new_tokens",
    "max_source_length",
    "max_target_length",
    "model_type",
    "num_beams",
    "output_dir",
    "output_text_key",
    "per_device_eval_batch_size",
    "prompt_template",
    "quiet",
    "random_state",
    "split_column",
    "split_strategy",
    "start",
    "task",
    "train_size",
    "trust_remote_code",
    "validation_size",
]
OLD_TRAINING_INPUTS = [
    "activation_memory_gb",
    "deepspeed",
    "extra_training_args",
    "fsdp",
    "fsdp_config",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "learning_rate",
    "max_steps",
    "model_id",
    "num_train_epochs",
    "per_device_train_batch_size",
    "resume_from_checkpoint",
    "seed",
    "use_lora",
]
OLD_LORA_INPUTS = ["init_adapter_path", "lora_alpha", "lora_dropout", "r", "target_modules"]
OLD_INPUTS = {
    "base": [*OLD_COMMON_INPUTS, *OLD_TRAINING_INPUTS, *OLD_LORA_INPUTS],
    "full": [*OLD_COMMON_INPUTS, *OLD_TRAINING_INPUTS],
    "presaved": [*OLD_COMMON_INPUTS, "presaved_model_path"],
    "causal": [*OLD_COMMON_INPUTS, *OLD_TRAINING_INPUTS, *OLD_LORA_INPUTS],
    "sql": [*OLD_COMMON_INPUTS, *OLD_TRAINING_INPUTS, *OLD_LORA_INPUTS, "sql_query", "sql_table"],
}
# inputs that say where the data is and what to read from it: checked with the data
DATA_INPUTS = {
    "data_path",
    "input_text_key",
    "output_text_key",
    "split_column",
    "sql_table",
    "sql_query",
    "prompt_template",
    "context_key",
}
AFTER_THE_DATA = ("tokenization", "model", "training", "evaluation", "report", "artifacts")
PACKAGE = REPO / "finetune_module"


def _driver(config: dict[str, Any]) -> driver.Driver:
    return driver.Builder().with_config(config).with_modules(*finetune_module.MODULES).build()


def _stage(function: Any) -> str:
    return function.__module__.rsplit(".", 1)[-1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_node_and_input_of_the_first_round_still_exists(name: str) -> None:
    variables = _driver(CONFIGS[name]).list_available_variables()
    nodes = {v.name for v in variables if not v.is_external_input}
    inputs = {v.name for v in variables if v.is_external_input}
    assert not set(OLD_NODES[name]) - nodes
    assert not set(OLD_INPUTS[name]) - inputs
    # the four outputs of the reference module are real nodes, not deprecated aliases
    assert not set(finetune_module.DEFAULT_OUTPUTS) & set(DEPRECATED_NODES)


def test_every_renamed_node_is_a_deprecated_alias_of_its_replacement(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    aliases = {
        "validation_set_metrics": "finetuned_validation_metrics",
        "hold_out_set_metrics": "finetuned_hold_out_metrics",
        "base_validation_set_metrics": "base_validation_metrics",
        "base_hold_out_set_metrics": "base_hold_out_metrics",
        "base_model_on_validation_set": "base_validation_answers",
        "base_model_on_hold_out_set": "base_hold_out_answers",
        "validation_loss": "finetuned_validation_loss",
        "evaluation_model": "finetuned_model",
    }
    others = ["finetuned_model_answers", "base_model_answers", "mixed_precision"]
    others += ["auto_model_class", "quantization_config", "scaling_arguments"]
    outputs = [*aliases, *aliases.values(), *others, "finetuned_hold_out_answers"]
    inputs = {"data_path": str(EXAMPLE_DATA), "input_text_key": "question"}
    inputs |= {"output_text_key": "reply", "model_id": str(tiny_model_dir), **QUICK}
    with pytest.warns(DeprecationWarning) as warned:
        result = _driver(CONFIGS["base"]).execute(
            outputs, inputs={**inputs, "output_dir": str(tmp_path)}
        )
    said = {str(w.message).split("'")[1] for w in warned if str(w.message).startswith("The node '")}
    assert said == {*aliases, *others}
    for old, new in aliases.items():
        assert result[old] is result[new] and result[new] is not None
    assert result["finetuned_model_answers"]["hold_out"] == result["finetuned_hold_out_answers"]
    assert set(result["base_model_answers"]) == {"validation", "hold_out"}
    assert result["mixed_precision"] == "no" and result["quantization_config"] is None
    assert result["auto_model_class"] is AUTO_CLASSES["seq2seq"]
    assert result["scaling_arguments"]["ddp_find_unused_parameters"] is False
    assert set(DEPRECATED_NODES) >= {*aliases, *others}


def test_the_old_model_nodes_build_the_models_they_named(tiny_model_dir: Path) -> None:
    inputs = {"data_path": str(EXAMPLE_DATA), "input_text_key": "question"}
    inputs |= {"output_text_key": "reply", "model_id": str(tiny_model_dir)}
    with pytest.warns(DeprecationWarning):
        models = _driver(CONFIGS["base"]).execute(
            ["base_model", "peft_model", "trainable_model"], inputs=inputs
        )
    assert not hasattr(models["base_model"], "peft_config") and not models["base_model"].training
    trainable = [n for n, p in models["peft_model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert type(models["trainable_model"]) is type(models["peft_model"])


@pytest.mark.parametrize("old", sorted(finetune_module.MOVED_MODULES))
def test_moved_modules_import_from_their_old_names_with_a_warning(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    new = importlib.import_module(finetune_module.MOVED_MODULES[old])
    names = [name for name in vars(new) if not name.startswith("_")]
    assert names and all(getattr(module, name) is getattr(new, name) for name in names)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_everything_after_the_data_depends_on_the_one_settings_node(name: str) -> None:
    dr = _driver(CONFIGS[name])
    graph_nodes = [n for n in dr.graph.get_nodes() if not n.user_defined]
    checked = {n.name for n in dr.what_is_downstream_of("settings")}
    for node in graph_nodes:
        constant = not node.dependencies  # a value of the config (source_truncation): no work
        if _stage(node.originating_functions[0]) in AFTER_THE_DATA and not constant:
            assert node.name in checked, f"{node.name} does not depend on the settings"
    # every input that is a setting is read by the settings node and by nothing else
    for variable in dr.list_available_variables():
        if not variable.is_external_input or variable.name in DATA_INPUTS:
            continue
        readers = {n.name for n in graph_nodes if variable.name in {d.name for d in n.dependencies}}
        assert readers - set(DEPRECATED_NODES) <= {"settings"}, variable.name


def test_an_input_read_by_several_nodes_has_one_default_everywhere() -> None:
    defaults: dict[str, set[str]] = {}
    for module in finetune_module.MODULES:
        for _, function in inspect.getmembers(module, inspect.isfunction):
            if function.__module__ != module.__name__:
                continue
            for parameter in inspect.signature(function).parameters.values():
                if parameter.default is not inspect.Parameter.empty:
                    defaults.setdefault(parameter.name, set()).add(repr(parameter.default))
    assert {name: values for name, values in defaults.items() if len(values) > 1} == {}


@pytest.mark.parametrize("module", finetune_module.MODULES, ids=lambda m: m.__name__)
def test_stage_modules_hold_nodes_and_private_helpers_only(module: Any) -> None:
    nodes = {
        function
        for config in CONFIGS.values()
        for node in _driver(config).graph.get_nodes()
        for function in node.originating_functions or ()
    }
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        assert not inspect.isclass(value), f"{module.__name__}.{name}: a class in a stage"
        if inspect.isfunction(value):
            assert value in nodes, f"{module.__name__}.{name} is public but not a node"


def _is_module(package: str, name: str) -> bool:
    """Whether `from package import name` imports a module."""
    return inspect.ismodule(getattr(importlib.import_module(package), name, None))


def _private_imports(path: Path) -> list[str]:
    """`from finetune_module... import _name` and `<finetune_module module>._name` in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, ours = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune_module"):
            for alias in node.names:
                if _is_module(node.module or "", alias.name):
                    ours.add(alias.asname or alias.name)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ours
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    files = [*PACKAGE.rglob("*.py"), REPO / "run.py", *(REPO / "bench").glob("*.py")]
    assert [found for path in files for found in _private_imports(path)] == []


def test_the_engine_works_without_hamilton() -> None:
    for path in (PACKAGE / "engine").glob("*.py"):
        imported = [
            alias.name if isinstance(node, ast.Import) else node.module
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [node])
        ]
        assert not [name for name in imported if (name or "").startswith("hamilton")], path.name


# --- pictures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_driver() -> driver.Driver:
    return _driver(CONFIGS["base"])


def test_the_overview_has_one_box_per_stage_and_the_values_between_them(
    base_driver: driver.Driver, tmp_path: Path
) -> None:
    dot = Path(finetune_module.draw_dag(base_driver, str(tmp_path / "dag.dot"))).read_text()
    boxes = re.findall(r"^\t(\w+) \[label=", dot, re.MULTILINE)[1:]  # after the title
    assert boxes == ["inputs", *finetune_module.STAGE_NAMES, "outputs"]
    edges = dict(
        ((source, target), label)
        for source, target, label in re.findall(
            r"^\t(\w+) -> (\w+) \[(.*?)\]$", dot, re.MULTILINE | re.DOTALL
        )
    )
    assert "fitted_weights" in edges[("training", "evaluation")]
    assert "model_recipe" in edges[("model", "training")]
    assert "report_html" in edges[("report", "artifacts")]
    assert ("evaluation", "training") not in edges  # the flow only goes forward
    assert "deprecated" not in dot and "evaluation_model" not in dot


@pytest.mark.parametrize("stage", [*finetune_module.STAGE_NAMES, "all"])
def test_each_stage_draws_its_nodes_in_full(
    base_driver: driver.Driver, stage: str, tmp_path: Path
) -> None:
    dot = Path(finetune_module.draw_dag(base_driver, str(tmp_path / "s.dot"), stage)).read_text()
    stages = finetune_module.STAGE_NAMES if stage == "all" else (stage,)
    for node in base_driver.graph.get_nodes():
        if not node.user_defined and _stage(node.originating_functions[0]) in stages:
            assert f"\t{node.name} [" in dot, node.name
            inputs = [d.name for d in node.dependencies if d.user_defined]
            assert all(name in dot for name in inputs)


def test_pictures_are_pngs_and_bad_requests_are_refused(
    base_driver: driver.Driver, tmp_path: Path
) -> None:
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed")
    picture = tmp_path / "overview.png"
    finetune_module.draw_dag(base_driver, str(picture))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(finetune_module.SettingsError, match="stage must be one of settings"):
        finetune_module.draw_dag(base_driver, str(tmp_path / "x.png"), "nowhere")
    with pytest.raises(finetune_module.SettingsError, match=r"draw to one of \.png"):
        finetune_module.draw_dag(base_driver, str(tmp_path / "x.jpg"))


def test_models_are_built_by_the_engines_builder_only() -> None:
    """Outside `engine/models.py` (and the tiny-model tool), no code loads a model or puts an
    adapter on one: every model comes from a recipe and `build_model`."""
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("models.py", "tiny_model.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            assert not called.startswith(("AutoModelFor", "PeftModel")), f"{path.name}: {called}"
            assert called not in ("get_peft_model", "load_model"), f"{path.name}: {called}"
