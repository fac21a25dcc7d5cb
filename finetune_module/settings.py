"""Settings stage: every setting of the run, checked in one place before any data is read or
any model is loaded.

`settings` takes every input that is a setting (everything but where the data is and which of
its keys to read, which the data stage checks against the data) and checks it; a bad value is
one `SettingsError` naming the input. The other stages take the checked groups it hands on
(`split_settings`, `length_settings`, `model_settings`, `training_settings`,
`evaluation_settings`, `run_dir`, `show_progress`), never the raw inputs, so nothing that loads,
trains or writes can start before every setting is checked, whatever order Hamilton visits
nodes in. Each group is plain data (`finetune_module.engine.settings`): a cached re-run whose
generation settings changed does not train again.
"""

from typing import Any

import torch
from hamilton.function_modifiers import cache, extract_fields

from finetune_module.engine import settings as checked
from finetune_module.engine.distributed import is_main_process, process_device
from finetune_module.engine.files import RunLock
from finetune_module.engine.loading import DEFAULT_MODEL_ID, resolve_model_id
from finetune_module.engine.run_info import differing_settings

DEFAULT_OUTPUT_DIR = "finetuned-model"


@cache(behavior="disable")  # joins the process group: always run, never cached
def device() -> torch.device:
    """Where this process's model runs: a CUDA GPU when there is one (under `torchrun` or
    `accelerate launch`, the process's own GPU, cuda:LOCAL_RANK), else the CPU.

    Under a launcher the process joins the others here (gloo on CPU, nccl on GPU).
    """
    return process_device()


@cache(behavior="recompute")  # files named in the settings may have changed: always check
@extract_fields(
    {
        "split_settings": checked.SplitSettings,
        "length_settings": checked.LengthSettings,
        "model_settings": checked.ModelSettings,
        "training_settings": checked.TrainingSettings,
        "evaluation_settings": checked.EvaluationSettings,
        "run_dir": str,
        "show_progress": bool,
        "non_default_settings": dict,
    }
)
def settings(
    device: torch.device,
    # how the records are split
    random_state: int = 42,
    train_size: float | int = 0.95,
    validation_size: float | int = 0.8,
    split_strategy: str = "random",
    # lengths
    max_source_length: int | None = None,
    max_target_length: int | None = None,
    length_percentile: float | int = 95.0,
    # the model
    model_id: str = DEFAULT_MODEL_ID,
    model_type: str = "seq2seq",
    use_lora: bool = True,
    trust_remote_code: bool = False,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float | int = 0.05,
    target_modules: list[str] | None = None,
    init_adapter_path: str | None = None,
    presaved_model_path: str | None = None,
    bf16: bool = False,
    fp16: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    cpu_speedups: bool | list[str] | None = None,
    seed: int = 42,
    # training
    output_dir: str = DEFAULT_OUTPUT_DIR,
    num_train_epochs: float | int = 2.0,
    max_steps: int = -1,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int = 8,
    learning_rate: float | int = 1e-3,
    gradient_accumulation_steps: int = 1,
    resume_from_checkpoint: bool | str = False,
    extra_training_args: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    deepspeed: str | dict[str, Any] | None = None,
    fsdp: bool = False,
    fsdp_config: str | dict[str, Any] | None = None,
    activation_memory_gb: float | int | str | None = checked.AUTO,
    report_to: str | list[str] = "none",
    # evaluation
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    generation_batch_size: int = 32,
    task: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """The run's settings, checked, in groups: how the records are split, the length caps, the
    model, training, evaluation, the run's directory, whether progress is shown, and the
    settings that differ from their defaults (`non_default_settings`: name -> value and
    default, credentials masked; the run's report lists them).

    :param device: where the model runs (mixed precision, quantization, DeepSpeed and FSDP
        need a CUDA GPU).
    :param random_state: seed of the shuffle that splits the records; the same seed gives the
        same split.
    :param train_size: fraction of records used for training (default 0.95).
    :param validation_size: fraction of the remaining records used for validation (default
        0.8); the rest is the hold-out set.
    :param split_strategy: "random" shuffles first; "last" keeps file order, so the validation
        and hold-out sets are the tail of the file.
    :param max_source_length: a fixed input cap in tokens; by default the cap comes from the
        data (see length_percentile).
    :param max_target_length: a fixed target cap in tokens (also the default bound of a
        generated answer); by default the cap comes from the data.
    :param length_percentile: percentile of the input (and target) lengths used as the cap
        (default 95).
    :param model_id: a Hugging Face model id (default google/flan-t5-small) or a local
        directory: any AutoModelForSeq2SeqLM, or any AutoModelForCausalLM with model_type
        "causal".
    :param model_type: the config key choosing the kind of model: "seq2seq" (encoder-decoder:
        T5, BART, ...; the default) or "causal" (decoder-only: GPT-2, Llama, ...).
    :param use_lora: the config key choosing LoRA (True, the default) or full fine-tuning
        (False: every weight trains; it takes a lower learning_rate, e.g. 5e-5).
    :param trust_remote_code: allow code shipped with the model to run (off unless you ask).
    :param r: rank of the LoRA update matrices.
    :param lora_alpha: scaling of the LoRA update (multiplied by lora_alpha / r).
    :param lora_dropout: dropout on the adapter's input during training.
    :param target_modules: names of the linear layers to adapt; default `q`, `v` for T5 and the
        attention query/value projections of other architectures (`c_attn` for GPT-2,
        `q_proj`, `v_proj` for Llama, Mistral and OPT, ...).
    :param init_adapter_path: a saved adapter (a `best_model/` or `checkpoint-N/` folder) to
        continue training instead of a fresh LoRA; its own rank and targets are kept, so the
        LoRA settings (r, lora_alpha, ...) do not apply. It should have been trained on
        model_id.
    :param presaved_model_path: with {"start": "presaved"}: any directory holding a saved
        fine-tune, a LoRA adapter (`adapter_config.json`) or a full model (`config.json`), such
        as a `best_model/` or a Trainer `checkpoint-N/` folder (default: output_dir's best
        model).
    :param bf16: train in bfloat16 mixed precision (a CUDA GPU with bf16 support, or the
        CPU, where it is fast on CPUs that multiply bf16 natively: AVX512-BF16, as AMD Zen 4
        and later, or AMX, as Intel Sapphire Rapids and later); the safe choice for T5, whose
        activations can overflow in fp16. The answers are generated in fp32 either way.
    :param fp16: train in float16 mixed precision with loss scaling (any CUDA GPU).
    :param load_in_4bit: QLoRA: load the frozen base model in 4 bits (NF4, double
        quantization; a CUDA GPU and bitsandbytes).
    :param load_in_8bit: load the frozen base model in 8 bits (LLM.int8; a CUDA GPU and
        bitsandbytes).
    :param cpu_speedups: the CPU speed layer (see `finetune_module.engine.speedups`): by
        default (None) on when the model runs on the CPU, off on a GPU; True or False to force
        it; or a list of the pieces to apply. Each piece applies only to the model families a
        test proves it equal to the stock path for.
    :param seed: seed of the adapter's random initialisation, dropout and batch order.
    :param output_dir: the run's directory (default ./finetuned-model): checkpoints go to its
        `checkpoints/` folder, the best model to `best_model/` (an evaluation to `evaluation/`).
    :param num_train_epochs: passes over the training set.
    :param max_steps: if positive, the number of optimizer steps, overriding num_train_epochs.
    :param per_device_train_batch_size: examples per training batch of each process.
    :param per_device_eval_batch_size: examples per batch of the validation loss.
    :param learning_rate: peak learning rate of AdamW (LoRA takes a higher one than full
        fine-tuning).
    :param gradient_accumulation_steps: batches per optimizer step.
    :param resume_from_checkpoint: True to continue from the last complete checkpoint in
        `<output_dir>/checkpoints` (training starts afresh when there is none yet), or the path
        of a `checkpoint-N` folder to continue from; False (default) trains from the start.
    :param extra_training_args: any other `Seq2SeqTrainingArguments` field, passed straight
        through and overriding the values above (e.g. {"warmup_steps": 10}).
    :param gradient_checkpointing: recompute every layer's activations in the backward pass
        to save memory.
    :param deepspeed: a DeepSpeed JSON config file (ZeRO stage, offload, ...), or its contents
        (CUDA GPUs).
    :param fsdp: shard the model, gradients and optimizer state across the processes with
        PyTorch FSDP instead of replicating the model (DDP; CUDA GPUs).
    :param fsdp_config: a JSON file of FSDP settings (or its contents), e.g.
        {"version": 2, "reshard_after_forward": true}.
    :param activation_memory_gb: about how much memory (GB) a training batch may keep for its
        backward pass; a longer batch goes forward and backward in parts that stay within it
        (the same gradients; dropout draws its masks part by part), and where one example alone
        does not fit, recomputes just enough layers' activations. "auto" (default): 3.6 times
        the size of the model's weights, at least 0.25 GB; None: no limit (most memory). Part
        of the CPU speed layer.
    :param report_to: where the Trainer logs its training and evaluation metrics: "none"
        (default), "all" (every integration installed), or the name of one or a list of them,
        e.g. "tensorboard" (logs under `<output_dir>/checkpoints/runs`), "wandb" or "mlflow"
        (the Trainer's own MLflow logging; `--mlflow` logs the whole run instead).
    :param num_beams: 1 for greedy decoding (default), more for beam search.
    :param max_new_tokens: the most tokens an answer may have (default: the target cap).
    :param generation_batch_size: questions answered at once.
    :param task: "auto" (default): the targets are class labels when there are at most 20
        distinct ones and each occurs at least twice (accuracy and macro-F1 are reported then);
        "classification": they are labels; "generation": they are free text.
    :param quiet: no progress bars (training, generation, and the libraries' own: loading
        weights, writing model shards), no training log lines and no library warnings.
    """
    given = {name: value for name, value in locals().items() if name != "device"}  # the inputs
    mixed_precision = checked.mixed_precision(device, bf16, fp16)
    quantization = checked.quantization(device, load_in_4bit, load_in_8bit)
    deepspeed_settings = checked.json_settings(deepspeed, "deepspeed")
    training = checked.TrainingSettings(
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        learning_rate=learning_rate,
        gradient_accumulation_steps=gradient_accumulation_steps,
        seed=seed,
        resume_from_checkpoint=resume_from_checkpoint,
        extra_training_args=dict(extra_training_args or {}),
        gradient_checkpointing=gradient_checkpointing,
        deepspeed=deepspeed_settings,
        fsdp=fsdp,
        fsdp_config=checked.json_settings(fsdp_config, "fsdp_config"),
        activation_memory_gb=activation_memory_gb,
        report_to=checked.report_to_names(report_to),
    )
    checked.check_scaling(device, deepspeed_settings, fsdp)
    return {
        "split_settings": checked.SplitSettings(
            random_state, train_size, validation_size, split_strategy
        ),
        "length_settings": checked.LengthSettings(
            max_source_length, max_target_length, length_percentile
        ),
        "model_settings": checked.ModelSettings(
            model_id=resolve_model_id(model_id),
            model_type=model_type,
            use_lora=use_lora,
            trust_remote_code=trust_remote_code,
            lora=checked.LoraSettings(
                r, lora_alpha, lora_dropout, tuple(target_modules) if target_modules else None
            ),
            init_adapter_path=init_adapter_path,
            presaved_model_path=presaved_model_path,
            mixed_precision=mixed_precision,
            quantization=quantization,
            speedups=checked.speedups_requested(device, cpu_speedups),
            seed=seed,
        ),
        "training_settings": training,
        "evaluation_settings": checked.EvaluationSettings(
            num_beams, max_new_tokens, generation_batch_size, per_device_eval_batch_size, task
        ),
        "run_dir": checked.output_directory(output_dir),
        "show_progress": not quiet,
        "non_default_settings": differing_settings(settings, given),
    }


@cache(behavior="recompute")  # taken on each run; "disable" would stop dependents caching
def run_lock(run_dir: str) -> RunLock:
    """This run's hold on its output directory, from the first node that writes there until
    `save_best_models` has written the last file (or, when the run fails, until its results
    are garbage-collected or the process ends): a second run into the same directory is
    refused at once, naming this one (PID, host, start time). The main process holds it; the
    other processes of a multi-process run write nothing. (`run.py` takes the directory
    before the run starts.)"""
    return RunLock(run_dir, hold=is_main_process())
