"""Shared fixtures: a tiny local T5 and one real run of the dataflow, all offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach for the hub
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hamilton import driver

import finetune_module
from finetune_module.tiny_model import Sizes, build, build_t5, texts_of

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = REPO / "example-support-dataset.json"

# Small and fast: one layer each side, d_model 32 (a training step takes milliseconds).
TINY = {"vocab_size": 400, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64}


def run_dag(start: str, *, source: str = "file", **inputs: Any) -> dict[str, Any]:
    """Runs the dataflow the way a user's run file does, and returns the four outputs."""
    dr = (
        driver.Builder()
        .with_config({"start": start, "source": source})
        .with_modules(*finetune_module.MODULES)
        .build()
    )
    base_inputs = {"input_text_key": "question", "output_text_key": "reply"}
    return dr.execute(list(finetune_module.DEFAULT_OUTPUTS), inputs={**base_inputs, **inputs})


def data_stage(source: str = "file", **inputs: Any) -> dict[str, Any]:
    """The data stage's outputs (and the tokenized training set) for a source, from the driver."""
    dr = (
        driver.Builder()
        .with_config({"start": "base", "source": source})
        .with_modules(*finetune_module.MODULES)
        .build()
    )
    nodes = ["qa_table", "train_set", "validation_set", "hold_out_set", "tokenized_train"]
    base_inputs = {"input_text_key": "question", "output_text_key": "reply"}
    return dr.execute(nodes, inputs={**base_inputs, **inputs})


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The example dataset shipped with the project."""
    return EXAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 with a tokenizer trained on the example dataset, saved to disk."""
    path = tmp_path_factory.mktemp("tiny-t5")
    build_t5(str(path), texts_of(str(EXAMPLE_DATA)), **TINY)
    return path


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds a tiny model of a family (`tiny_model.FAMILIES`) with its own kind of tokenizer
    trained on the example data, once per session; returns its directory."""
    built: dict[str, Path] = {}

    def family_dir(family: str) -> Path:
        if family not in built:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build(str(path), texts_of(str(EXAMPLE_DATA)), family, Sizes(**TINY))
            built[family] = path
        return built[family]

    return family_dir


@pytest.fixture(scope="session")
def base_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fine-tune of the tiny model on the example data: its inputs, outputs and files."""
    output_dir = tmp_path_factory.mktemp("run")
    inputs = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(tiny_model_dir),
        "output_dir": str(output_dir),
        "num_train_epochs": 2,
        "learning_rate": 5e-3,
    }
    result = run_dag("base", **inputs)
    return {"inputs": inputs, "result": result, "output_dir": output_dir}


# A test of the CPU speed layer inside a real run: on a machine with a GPU the run trains there,
# where the layer is off unless asked for (settings.speedups_requested), so it has nothing to see.
cpu_path_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the run trains on the GPU here, where the CPU speed layer is off by default",
)

# a short fine-tune for tests that need a trained model but not a good one
QUICK = {"max_steps": 2, "max_new_tokens": 4}


def read_json(path: Path) -> Any:
    """The JSON value in a file."""
    return json.loads(path.read_text(encoding="utf-8"))
