"""Beyond one process: torchrun data parallelism on CPU, and the wiring of the GPU-only options
(mixed precision, QLoRA, DeepSpeed, FSDP), which must refuse clearly on a machine without CUDA."""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hamilton import driver
from peft import PeftModel
from transformers import BitsAndBytesConfig, PreTrainedModel

import finetune_module
from finetune_module.engine import distributed, models, speedups
from finetune_module.engine import settings as checked
from finetune_module.engine.settings import ModelSettings, TrainingSettings
from finetune_module.engine.trainer import scaling_arguments
from finetune_module.errors import SettingsError
from finetune_module.model import lora_config, model_recipe__lora
from tests.conftest import EXAMPLE_DATA, QUICK, REPO, cpu_path_only, read_json, run_dag
from tests.test_pipeline import N_HOLD_OUT, N_TRAIN, N_VALIDATION

CUDA = torch.device("cuda")  # a device object only: nothing runs on it in these tests


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _csv_rows(path: Path) -> list[tuple[str, ...]]:
    table = pd.read_csv(path, keep_default_na=False)
    return [tuple(row) for row in table.itertuples(index=False)]


@pytest.mark.slow
def test_torchrun_trains_on_two_processes_and_writes_once(
    tiny_model_dir: Path, base_run: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own
        "--nproc_per_node",
        "2",
        str(REPO / "run.py"),
        "--data",
        str(EXAMPLE_DATA),
        "--model-id",
        str(tiny_model_dir),
        "--output-dir",
        str(out),
        "--num_train_epochs",
        "1",
        "--learning_rate",
        "5e-3",
        "--generation-batch-size",
        "2",  # several generation batches, so that both processes generate
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # only the main process prints the summary and writes the best model
    assert done.stdout.count("Saved to:") == 1
    assert done.stderr.count(f"Wrote {out / 'best_model'}") == 1
    assert not list(out.glob(".best_model.tmp-*")) and not (out / "best_model.old").exists()

    saved = read_json(out / "best_model" / "metrics.json")
    metrics = saved["training_and_validation"]
    assert metrics["world_size"] == 2
    # each optimizer step took a batch of 8 on each of the 2 processes: half the steps of one
    assert metrics["global_step"] == math.ceil(N_TRAIN / (8 * 2))
    single = base_run["result"]["training_and_validation_set_metrics"]
    assert set(metrics) == set(single) and single["world_size"] == 1
    assert set(saved["hold_out"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["train_loss"])

    # the answers generated in two halves equal those of one process evaluating the saved model
    hold_out = _csv_rows(out / "best_model" / "hold_out_predictions.csv")
    validation = _csv_rows(out / "best_model" / "validation_predictions.csv")
    assert len(hold_out) == N_HOLD_OUT and len(validation) == N_VALIDATION
    again = run_dag(
        "presaved",
        data_path=str(EXAMPLE_DATA),
        output_dir=str(out),
        generation_batch_size=2,
    )
    assert again["hold_out_set_predictions"] == hold_out
    assert again["finetuned_model_on_validation_set"]["validation_predictions"] == [
        prediction for _, prediction, _ in validation
    ]
    assert again["training_and_validation_set_metrics"]["eval_loss"] == pytest.approx(
        metrics["eval_loss"], rel=1e-5
    )


def _trained(tiny_model_dir: Path, output_dir: Path, **inputs: Any) -> dict[str, Any]:
    """The fitted weights and training arguments of a 2-step run over the data in file order."""
    dr = (
        driver.Builder()
        .with_config({"start": "base"})
        .with_modules(*finetune_module.MODULES)
        .build()
    )
    settings = {
        "data_path": str(EXAMPLE_DATA),
        "input_text_key": "question",
        "output_text_key": "reply",
        "model_id": str(tiny_model_dir),
        "output_dir": str(output_dir),
        "max_steps": 2,
        "extra_training_args": {"logging_steps": 1, "train_sampling_strategy": "sequential"},
        **inputs,
    }
    return dr.execute(["fitted_weights", "training_arguments"], inputs=settings)


def test_gradient_accumulation_with_checkpointing_gives_the_same_step(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    whole = _trained(tiny_model_dir, tmp_path / "a", per_device_train_batch_size=8)
    halves = _trained(
        tiny_model_dir,
        tmp_path / "b",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
    )
    assert halves["training_arguments"].gradient_checkpointing
    assert not whole["training_arguments"].gradient_checkpointing
    # two half batches make the step of one whole batch: the seq2seq loss is a mean, so the
    # Trainer must divide it by the accumulation steps (unscaled, gradients and losses double)
    logs = [
        [entry for entry in run["fitted_weights"].trainer_state.log_history if "loss" in entry]
        for run in (whole, halves)
    ]
    for one, two in zip(*logs, strict=True):
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=0.15)
        assert two["loss"] == pytest.approx(one["loss"], rel=0.05)


@pytest.fixture(scope="module")
def tokenizer_only_model_dir(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny model's directory without its weights: loading the model from it fails."""
    path = tmp_path_factory.mktemp("no-weights")
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, path)
    return path


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fp16": True}, r"^fp16 needs a CUDA GPU; this machine has none"),
        ({"bf16": True, "fp16": True}, r"^bf16 and fp16 exclude each other"),
        ({"load_in_4bit": True}, r"^load_in_4bit \(a bitsandbytes-quantized .*\) needs a CUDA GPU"),
        ({"load_in_8bit": True}, r"^load_in_8bit \(a bitsandbytes-quantized .*\) needs a CUDA GPU"),
        ({"fsdp": True}, r"^fsdp needs CUDA GPUs; this machine has none"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, r"^deepspeed needs CUDA GPUs"),
    ],
)
def test_gpu_options_refuse_on_cpu_before_the_model_loads(
    tokenizer_only_model_dir: Path, tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        run_dag(
            "base",
            data_path=str(EXAMPLE_DATA),
            model_id=str(tokenizer_only_model_dir),
            output_dir=str(tmp_path),
            **settings,
        )
    assert not (tmp_path / "best_model").exists()


def test_bf16_on_the_cpu_is_accepted_and_warns_where_the_cpu_does_not_multiply_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(checked, "cpu_multiplies_bf16", lambda: True)
    with caplog.at_level("WARNING", logger=checked.__name__):
        assert checked.mixed_precision(cpu, bf16=True) == "bf16"
    assert not caplog.records
    monkeypatch.setattr(checked, "cpu_multiplies_bf16", lambda: False)
    with caplog.at_level("WARNING", logger=checked.__name__):
        assert checked.mixed_precision(cpu, bf16=True) == "bf16"
    assert "no native bf16 products" in caplog.text and "slower" in caplog.text
    with pytest.raises(SettingsError, match=r"^fp16 needs a CUDA GPU; this machine has none"):
        checked.mixed_precision(cpu, fp16=True)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # the check agrees with the CPU's flags as Linux names them
        words = set(cpuinfo.read_text().split())
        monkeypatch.undo()
        assert checked.cpu_multiplies_bf16() == bool(words & {"avx512_bf16", "amx_bf16"})


@cpu_path_only
def test_bf16_trains_on_the_cpu_with_the_speed_layer_and_answers_in_fp32(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on the CPU: the Trainer's autocast around the model on each thread that runs it,
    the step shared between threads, the loss without logits in fp32; the answers in fp32
    (no autocast); the result close to the fp32 run's."""
    autocast: list[tuple[bool, int, bool]] = []  # (autocast on, thread, gradients)

    def seen(module: torch.nn.Module, *_: Any) -> None:
        autocast.append(
            (torch.is_autocast_enabled("cpu"), threading.get_ident(), torch.is_grad_enabled())
        )

    def recorded(module: torch.nn.Module, *_: Any) -> None:
        if isinstance(module, PreTrainedModel):
            seen(module)

    hook = torch.nn.modules.module.register_module_forward_hook(recorded)
    losses: list[torch.dtype] = []
    fused = speedups.linear_cross_entropy
    monkeypatch.setattr(
        speedups,
        "linear_cross_entropy",
        lambda hidden, *rest: (losses.append(hidden.dtype), fused(hidden, *rest))[1],
    )
    common = {"data_path": str(EXAMPLE_DATA), "model_id": str(tiny_model_dir), **QUICK}
    common["r"] = 2  # an adapter small beside the tiny model: the workers share its steps
    try:
        ours = run_dag("base", output_dir=str(tmp_path / "bf16"), bf16=True, **common)
    finally:
        hook.remove()
    trained = [(on, thread) for on, thread, grads in autocast if grads]
    assert trained and all(on for on, _ in trained)
    assert len({thread for _, thread in trained}) == 2  # the step's rows on two threads
    answering = [on for on, _, grads in autocast if not grads]
    assert answering and not any(answering[-4:])  # the answers: no autocast
    assert losses and set(losses) == {torch.float32}
    assert (tmp_path / "bf16" / "best_model" / "adapter_model.safetensors").is_file()
    fp32 = run_dag("base", output_dir=str(tmp_path / "fp32"), **common)
    for key in ("train_loss", "eval_loss"):
        value = ours["training_and_validation_set_metrics"][key]
        assert math.isfinite(value)
        assert value == pytest.approx(fp32["training_and_validation_set_metrics"][key], rel=0.05)


def test_mixed_precision_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert checked.mixed_precision(CUDA) == "no"
    assert checked.mixed_precision(CUDA, fp16=True) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)
    assert checked.mixed_precision(CUDA, bf16=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    with pytest.raises(SettingsError, match=r"^bf16 needs .*; Tesla T4 has none: use fp16"):
        checked.mixed_precision(CUDA, bf16=True)


def test_quantization_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert checked.quantization(CUDA) is None
    with pytest.raises(SettingsError, match="exclude each other"):
        checked.quantization(CUDA, load_in_4bit=True, load_in_8bit=True)
    if not _installed("bitsandbytes"):
        with pytest.raises(
            SettingsError, match=r"^load_in_4bit needs the bitsandbytes package, which is not"
        ):
            checked.quantization(CUDA, load_in_4bit=True)
    monkeypatch.setattr(checked, "require_package", lambda *_: None)
    assert checked.quantization(CUDA, load_in_4bit=True) == "4bit"
    assert checked.quantization(CUDA, load_in_8bit=True) == "8bit"
    four = models.bitsandbytes_config("4bit", "bf16")
    assert isinstance(four, BitsAndBytesConfig) and four.load_in_4bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = models.bitsandbytes_config("8bit", "no")
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert models.bitsandbytes_config(None, "no") is None


def test_a_quantized_base_is_prepared_for_training(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    prepare = models.prepare_model_for_kbit_training
    loaded: list[Any] = []
    load = models.load_model

    def recording_prepare(model: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return prepare(model, **kwargs)

    def fp32_load(model_type: str, model_id: str, device: Any, trust: bool, config: Any) -> Any:
        loaded.append(config)  # bitsandbytes needs a GPU: load in fp32, as asked otherwise
        return load(model_type, model_id, device, trust, None)

    monkeypatch.setattr(models, "prepare_model_for_kbit_training", recording_prepare)
    monkeypatch.setattr(models, "load_model", fp32_load)
    settings = ModelSettings(str(tiny_model_dir), quantization="4bit")
    recipe = dataclasses.replace(model_recipe__lora(settings, lora_config(settings)), speedups=())
    peft = models.build_model(
        recipe, torch.device("cpu"), trainable=True, gradient_checkpointing=True
    )
    checkpointing = {"use_reentrant": False}
    assert calls == [
        {"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": checkpointing}
    ]
    assert isinstance(loaded[0], BitsAndBytesConfig) and loaded[0].load_in_4bit
    assert isinstance(peft, PeftModel)
    trainable = [name for name, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    models.build_model(
        dataclasses.replace(recipe, quantization=None), torch.device("cpu"), trainable=True
    )
    assert len(calls) == 1  # a full-precision base is left as it is


def test_scaling_arguments_pass_through(tmp_path: Path) -> None:
    plain = scaling_arguments(TrainingSettings(), "no")
    assert plain == {"bf16": False, "fp16": False, "ddp_find_unused_parameters": False}
    fsdp_file = tmp_path / "fsdp.json"
    fsdp_file.write_text(json.dumps({"version": 2, "reshard_after_forward": True}))
    settings = TrainingSettings(
        gradient_checkpointing=True,
        fsdp=True,
        fsdp_config=checked.json_settings(str(fsdp_file), "fsdp_config"),
    )
    arguments = scaling_arguments(settings, "bf16")
    assert arguments["bf16"] and not arguments["fp16"]
    assert arguments["gradient_checkpointing"]
    assert arguments["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert arguments["fsdp"] is True
    assert arguments["fsdp_config"] == {"version": 2, "reshard_after_forward": True}


def test_bad_deepspeed_and_fsdp_settings_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "ds.json"
    with pytest.raises(SettingsError, match=rf"^deepspeed: no such file '{missing}'"):
        checked.json_settings(str(missing), "deepspeed")
    missing.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(SettingsError, match=rf"^deepspeed: {missing} is not valid JSON \(.*line 1"):
        checked.json_settings(str(missing), "deepspeed")
    missing.write_text("[1, 2]")
    with pytest.raises(SettingsError, match="must hold a JSON object, got a list"):
        checked.json_settings(str(missing), "deepspeed")
    missing.write_text('{"zero_optimization": {"stage": 2}}')
    deepspeed = checked.json_settings(str(missing), "deepspeed")
    if not _installed("deepspeed"):
        with pytest.raises(SettingsError, match=r"^deepspeed needs the deepspeed package"):
            checked.check_scaling(CUDA, deepspeed, fsdp=False)
    with pytest.raises(SettingsError, match=r"^deepspeed and fsdp exclude each other"):
        TrainingSettings(deepspeed=deepspeed, fsdp=True)
    with pytest.raises(SettingsError, match=r"^fsdp_config is only used with fsdp"):
        TrainingSettings(fsdp_config={"version": 2})


def test_a_model_sharded_by_fsdp_counts_as_sharded_and_a_plain_one_does_not() -> None:
    from torch.distributed.fsdp import fully_shard  # as a user's FSDP run imports it

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert not distributed.weights_sharded(model)
    torch.distributed.init_process_group(
        "gloo", rank=0, world_size=1, store=torch.distributed.HashStore()
    )
    try:
        fully_shard(model)
        assert distributed.weights_sharded(model)
        assert not distributed.weights_sharded(torch.nn.Linear(2, 2))
    finally:
        torch.distributed.destroy_process_group()
