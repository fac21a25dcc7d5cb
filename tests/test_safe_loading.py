"""Safe loading: safetensors only, never a pickle file, no model code unless the user asks."""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_module.errors import ModelNotAvailableError
from tests.conftest import EXAMPLE_DATA, run_dag


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it creates a marker file (what a malicious .bin would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _with_pickle_weights(source: Path, target: Path, safetensors_name: str, bin_name: str) -> Path:
    """A copy of a saved model or adapter whose safetensors weights are replaced by a pickle
    file that runs code when loaded; returns the marker that code would create."""
    shutil.copytree(source, target)
    (target / safetensors_name).unlink()
    marker = target.parent / f"{target.name}-code-ran"
    torch.save(_RunsCodeWhenUnpickled(marker), target / bin_name)
    return marker


def test_adapter_saved_as_pickle_is_refused_unread(
    base_run: dict[str, Any], tmp_path: Path
) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    adapter = tmp_path / "adapter"
    marker = _with_pickle_weights(saved, adapter, "adapter_model.safetensors", "adapter_model.bin")
    with pytest.raises(ModelNotAvailableError) as error:
        run_dag(
            "presaved",
            data_path=str(EXAMPLE_DATA),
            presaved_model_path=str(adapter),
            output_dir=str(tmp_path / "out"),
        )
    assert str(error.value).startswith(f"presaved_model_path: '{adapter}' has no ")
    assert "adapter_model.safetensors (it has adapter_model.bin)" in str(error.value)
    assert "never pickle files" in str(error.value)
    with pytest.raises(ModelNotAvailableError, match=r"init_adapter_path: .* has no adapter_model"):
        run_dag(
            "base",
            data_path=str(EXAMPLE_DATA),
            model_id=base_run["inputs"]["model_id"],
            init_adapter_path=str(adapter),
            output_dir=str(tmp_path / "out"),
        )
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_model_saved_as_pickle_is_refused_unread(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    marker = _with_pickle_weights(tiny_model_dir, model, "model.safetensors", "pytorch_model.bin")
    with pytest.raises(ModelNotAvailableError) as error:
        run_dag(
            "base", data_path=str(EXAMPLE_DATA), model_id=str(model), output_dir=str(tmp_path / "o")
        )
    assert str(error.value).startswith(f"Could not load the model in '{model}'")
    assert "It has pytorch_model.bin: pickle weights are never loaded" in str(error.value)
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_model_code_does_not_run_unless_trusted(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "tiny-custom"
    config["auto_map"] = {
        "AutoConfig": "custom_code.TinyConfig",
        "AutoModelForSeq2SeqLM": "custom_code.TinyModel",
    }
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (model / "custom_code.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\n"
        "from transformers import T5Config as TinyConfig\n"
        "from transformers import T5ForConditionalGeneration as TinyModel\n"
    )
    with pytest.raises(ModelNotAvailableError) as error:
        run_dag(
            "base", data_path=str(EXAMPLE_DATA), model_id=str(model), output_dir=str(tmp_path / "o")
        )
    assert "contains custom code" in str(error.value)
    assert "trust_remote_code=True" in str(error.value)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    assert not (tmp_path / "o").exists()
