"""The benchmark's peer: the plain Hugging Face script a user would write instead of our dataflow.

    python -m bench.peer --data bench-data.json --model model-dir --out peer.json

`AutoModelForSeq2SeqLM` with a peft LoRA adapter (r 16, alpha 32, dropout 0.05, on the
attention's q and v), `DataCollatorForSeq2Seq`, a `Seq2SeqTrainer` with length-grouped batches
that evaluates each epoch and loads the checkpoint with the lowest validation loss at the end,
then `trainer.predict` with generation on the validation and hold-out sets, ROUGE from
rouge-score, and the adapter saved. It is written as a user would write it, top to bottom,
without our speed-ups.

It sees what our dataflow sees with its defaults: the same records split into the same sets,
inputs and targets cut to the 95th percentile of their token lengths over all records,
learning rate 1e-3, seed 42, greedy answers of up to the target cap. (It imports nothing of
ours, which would add a tenth of a GB to its memory; tests/test_bench.py checks that its
tokenized sets are the dataflow's.) It times its phases (training as the Trainer's
`train_runtime`, generation, the whole job from reading the data to the saved adapter) and its
peak memory, prints them and writes them as JSON.
"""

import argparse
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, TaskType, get_peft_model
from rouge_score import rouge_scorer
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    set_seed,
)
from transformers.trainer_utils import TrainOutput

# finetune_module's defaults, so that both see the same sets and train alike
TRAIN_SIZE = 0.95  # of the records; then VALIDATION_SIZE of the rest, the remainder held out
VALIDATION_SIZE = 0.8
SPLIT_SEED = 42
LENGTH_PERCENTILE = 95  # of the token lengths over all records: the input and target caps
SEED = 42
LEARNING_RATE = 1e-3
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}  # the adapter, on both scripts' q and v
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def split_records(records: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """The train, validation and hold-out records: the records shuffled with the split seed and
    cut at the split sizes, as our dataflow splits them."""
    n_train = math.floor(TRAIN_SIZE * len(records))
    n_validation = math.floor(VALIDATION_SIZE * (len(records) - n_train))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(records))
    shuffled = [records[i] for i in order]
    return {
        "train": shuffled[:n_train],
        "validation": shuffled[n_train : n_train + n_validation],
        "hold_out": shuffled[n_train + n_validation :],
    }


def training_arguments(
    output_dir: str, epochs: float, batch_size: int, bf16: bool = False
) -> dict[str, Any]:
    """The Trainer's arguments of both plain scripts: length-grouped batches, evaluation and a
    checkpoint each epoch, the best by validation loss loaded at the end, our learning rate
    and seed, no logging (as the benchmark runs our dataflow), and bf16 mixed precision where
    asked."""
    return {
        "bf16": bf16,
        # the Trainer trains in bf16 on a CPU only when told to use the CPU
        "use_cpu": bf16 and not torch.cuda.is_available(),
        "output_dir": os.path.join(output_dir, "checkpoints"),
        "num_train_epochs": epochs,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "learning_rate": LEARNING_RATE,
        "seed": SEED,
        "train_sampling_strategy": "group_by_length",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "save_total_limit": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "logging_strategy": "no",
        "disable_tqdm": True,
        "report_to": "none",
    }


def length_cap(token_lists: list[list[int]]) -> int:
    """A length cap in tokens: the 95th percentile of the lengths, rounded up (at least 2)."""
    return max(2, math.ceil(np.percentile([len(x) for x in token_lists], LENGTH_PERCENTILE)))


def tokenized_sets(
    records: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    input_key: str = "question",
    output_key: str = "reply",
) -> tuple[dict[str, Dataset], int, int]:
    """The three sets as `datasets.Dataset`s of `input_ids`, `attention_mask` and `labels`
    (truncated, not padded), with the input and target caps in tokens: the 95th percentile of
    the lengths over all records, rounded up, as our dataflow derives them."""
    source_cap = length_cap(tokenizer([r[input_key] for r in records]).input_ids)
    target_cap = length_cap(tokenizer(text_target=[r[output_key] for r in records]).input_ids)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        features = tokenizer(batch[input_key], max_length=source_cap, truncation=True)
        targets = tokenizer(text_target=batch[output_key], max_length=target_cap, truncation=True)
        features["labels"] = targets["input_ids"]
        return features

    sets = {
        name: Dataset.from_list(rows).map(tokenize, batched=True, remove_columns=list(rows[0]))
        for name, rows in split_records(records).items()
    }
    return sets, source_cap, target_cap


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (x100, with stemming) of the predictions against the references;
    for ROUGE-Lsum each sentence on its own line."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)

    def lines(text: str) -> str:
        return "\n".join(re.split(r"(?<=[.!?])\s+", text.strip()))

    scores = [
        scorer.score(lines(r), lines(p)) for p, r in zip(predictions, references, strict=True)
    ]
    return {k: round(100 * float(np.mean([s[k].fmeasure for s in scores])), 4) for k in ROUGE_KEYS}


def run(
    data_path: str,
    model_path: str,
    output_dir: str,
    epochs: float = 1.0,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Fine-tunes the model on the data as the plain script does, and returns its figures.

    :param data_path: a JSON list of {"question", "reply"} records.
    :param model_path: a sequence-to-sequence model directory (weights and tokenizer).
    :param output_dir: where the checkpoints and the saved adapter go.
    :param epochs: training epochs.
    :param batch_size: training and evaluation batch size.
    :param max_new_tokens: the longest answer, in tokens (default: the target cap).
    :param bf16: train in bf16 mixed precision (the Trainer's `bf16`; on a CPU too).
    """
    started = time.perf_counter()
    records = json.loads(Path(data_path).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sets, source_cap, target_cap = tokenized_sets(records, tokenizer)

    set_seed(SEED)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_path)
    lora = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, target_modules=["q", "v"], **LORA)
    model = get_peft_model(model, lora)

    args = Seq2SeqTrainingArguments(
        **training_arguments(output_dir, epochs, batch_size, bf16), predict_with_generate=True
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=sets["train"],
        eval_dataset=sets["validation"],  # no compute_metrics: evaluation computes the loss
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    trained = trainer.train()

    generation_started = time.perf_counter()
    answers: dict[str, list[str]] = {}
    generated_tokens = 0
    losses: dict[str, float] = {}
    for name in ("validation", "hold_out"):
        output = trainer.predict(
            sets[name], max_new_tokens=max_new_tokens or target_cap, num_beams=1, do_sample=False
        )
        ids = np.where(output.predictions != -100, output.predictions, tokenizer.pad_token_id)
        generated_tokens += int((ids[:, 1:] != tokenizer.pad_token_id).sum())  # after the start
        answers[name] = [a.strip() for a in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        losses[name] = output.metrics["test_loss"]
    generation_seconds = time.perf_counter() - generation_started

    return finished(
        trainer,
        trained,
        records,
        sets,
        (source_cap, target_cap),
        answers,
        generated_tokens=generated_tokens,
        generation_seconds=generation_seconds,
        validation_loss=losses["validation"],
        output_dir=output_dir,
        started=started,
    )


def finished(
    trainer: Trainer,
    trained: TrainOutput,
    records: list[dict[str, str]],
    sets: dict[str, Dataset],
    caps: tuple[int, int],
    answers: dict[str, list[str]],
    *,
    generated_tokens: int,
    generation_seconds: float,
    validation_loss: float,
    output_dir: str,
    started: float,
) -> dict[str, Any]:
    """The end of a peer script: the answers scored against the references, the adapter
    saved, and the script's figures (its phases' times from `started`, peak memory, scores)."""
    references = {name: [r["reply"] for r in rows] for name, rows in split_records(records).items()}
    scores = {name: rouge(answers[name], references[name]) for name in answers}
    trainer.save_model(os.path.join(output_dir, "adapter"))
    whole_seconds = time.perf_counter() - started

    return {
        "records": len(records),
        "train_examples": len(sets["train"]),
        "validation_examples": len(sets["validation"]),
        "hold_out_examples": len(sets["hold_out"]),
        "source_length_cap": caps[0],
        "target_length_cap": caps[1],
        "epochs": trained.metrics["epoch"],
        "steps": trained.global_step,
        "train_seconds": trained.metrics["train_runtime"],
        "best_eval_loss": trainer.state.best_metric,
        "validation_loss": validation_loss,
        "generated_answers": sum(map(len, answers.values())),
        "generated_tokens": generated_tokens,
        "generation_seconds": generation_seconds,
        "whole_seconds": whole_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "torch_threads": torch.get_num_threads(),
        "rouge": scores,
        "answers": answers,
    }


def flush_subnormals() -> bool:
    """Flushes subnormal floats to zero (inputs and results) on every thread torch runs on from
    now on: `torch.set_flush_denormal` sets it for the calling thread, and the threads torch
    starts later inherit it, so this must run before torch's first parallel operation. Returns
    whether this CPU can (x86 with SSE3 can). On some CPUs a product with subnormal operands
    runs tens of times slower, and the script's cross-entropy makes them: its softmax of
    logits hundreds apart (the benchmark model's random weights) is mostly below the least
    normal float."""
    return torch.set_flush_denormal(True)


def main(
    argv: list[str] | None = None,
    script: Callable[..., dict[str, Any]] = run,
    prog: str = "python -m bench.peer",
    description: str = __doc__.split("\n\n")[0],
) -> int:
    """Command line of a peer script (this one, or `bench.peer_causal`'s with its `run` as
    `script`): runs it on the data and model and writes its figures as JSON."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--data", required=True, help="JSON list of {question, reply} records")
    p.add_argument("--model", required=True, help="model directory (weights and tokenizer)")
    p.add_argument("--epochs", type=float, default=1.0, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: the target cap)")
    p.add_argument("--output-dir", help="checkpoints and adapter (default: a temp dir)")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument(
        "--flush-subnormals",
        action="store_true",
        help="flush subnormal floats to zero on every thread (not what the plain script does: "
        "to measure what they cost it)",
    )
    p.add_argument(
        "--mkl-avx512",
        action="store_true",
        help="MKL's AVX-512 kernels on an AMD processor with AVX-512, as our dataflow takes "
        "them (not what the plain script does: to measure what they give it)",
    )
    p.add_argument(
        "--bf16", action="store_true", help="train in bf16 mixed precision (the Trainer's bf16)"
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.flush_subnormals and not flush_subnormals():
        raise SystemExit("This CPU cannot flush subnormal floats to zero.")
    if args.mkl_avx512:  # imported only here: the plain script does without our package
        from finetune_module.engine import mkl_kernels

        if not mkl_kernels.use_avx512_kernels():
            raise SystemExit(f"MKL's kernels stay its own choice here: {mkl_kernels.refusal()}.")
    figures = script(
        args.data,
        args.model,
        args.output_dir or tempfile.mkdtemp(prefix="finetune-peer-"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        bf16=args.bf16,
    )
    figures["flush_subnormals"] = args.flush_subnormals
    figures["mkl_avx512"] = args.mkl_avx512
    figures["precision"] = "bf16 autocast" if args.bf16 else "fp32"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(
        f"peer: training {figures['train_seconds']:.1f} s ({figures['steps']} steps), "
        f"generation {figures['generation_seconds']:.1f} s ({figures['generated_answers']} "
        f"answers), whole job {figures['whole_seconds']:.1f} s, "
        f"peak RSS {figures['peak_rss_gb']:.2f} GiB; figures written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
