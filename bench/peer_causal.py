"""The benchmark's peer for a decoder-only model: the plain Hugging Face script a user would
write for one instead of our dataflow.

    python -m bench.peer_causal --data bench-data.json --model model-dir --out peer.json

`AutoModelForCausalLM` with a peft LoRA adapter (r 16, alpha 32, dropout 0.05, on the
attention's q_proj and v_proj); each example is the question's tokens followed by the reply's
and the end-of-sequence token, labelled on the reply only; `DataCollatorForSeq2Seq` pads them
(the labels with -100); a `Trainer` with length-grouped batches evaluates each epoch and loads
the checkpoint with the lowest validation loss at the end; then `model.generate`, greedy, on
the validation and hold-out questions in batches padded on the left; ROUGE from rouge-score;
the adapter saved. Written as a user would write it, without our speed-ups.

It sees what our dataflow sees with `{"model_type": "causal"}` and its defaults: the same
records split into the same sets, the question and the reply cut to the 95th percentile of
their token lengths over all records (a long question keeps its first token and its end, next
to the reply; a long reply its end-of-sequence token), learning rate 1e-3, seed 42, answers of
up to the reply's cap. tests/test_bench.py checks that its examples are the dataflow's. The
command line, the split, the caps' percentile, ROUGE and the figures are `bench.peer`'s.
"""

import json
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from bench.peer import (
    LORA,
    SEED,
    finished,
    length_cap,
    main,
    split_records,
    training_arguments,
)


def tokenized_sets(
    records: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    input_key: str = "question",
    output_key: str = "reply",
) -> tuple[dict[str, Dataset], int, int]:
    """The three sets as `datasets.Dataset`s of `input_ids` (the question's tokens, then the
    reply's and the end-of-sequence token), `attention_mask` and `labels` (-100 over the
    question), not padded, with the question's and the reply's caps in tokens."""
    eos = tokenizer.eos_token_id
    questions = tokenizer([r[input_key] for r in records]).input_ids
    replies = tokenizer([r[output_key] for r in records], add_special_tokens=False).input_ids
    source_cap = length_cap(questions)
    target_cap = length_cap([[*ids, eos] for ids in replies])

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        features: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        questions = tokenizer(batch[input_key]).input_ids
        replies = tokenizer(batch[output_key], add_special_tokens=False).input_ids
        for question, reply in zip(questions, replies, strict=True):
            if len(question) > source_cap:  # its first token and its end
                question = question[:1] + question[len(question) - source_cap + 1 :]
            reply = [*reply[: target_cap - 1], eos]
            features["input_ids"].append(question + reply)
            features["labels"].append([-100] * len(question) + reply)
        features["attention_mask"] = [[1] * len(ids) for ids in features["input_ids"]]
        return features

    sets = {
        name: Dataset.from_list(rows).map(tokenize, batched=True, remove_columns=list(rows[0]))
        for name, rows in split_records(records).items()
    }
    return sets, source_cap, target_cap


def run(
    data_path: str,
    model_path: str,
    output_dir: str,
    epochs: float = 1.0,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Fine-tunes the decoder-only model on the data as the plain script does, and returns
    its figures (`bench.peer.finished`).

    :param data_path: a JSON list of {"question", "reply"} records.
    :param model_path: a decoder-only model directory (weights and tokenizer).
    :param output_dir: where the checkpoints and the saved adapter go.
    :param epochs: training epochs.
    :param batch_size: training, evaluation and generation batch size.
    :param max_new_tokens: the longest answer, in tokens (default: the reply's cap).
    :param bf16: train in bf16 mixed precision (the Trainer's `bf16`; on a CPU too).
    """
    started = time.perf_counter()
    records = json.loads(Path(data_path).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sets, source_cap, target_cap = tokenized_sets(records, tokenizer)

    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["q_proj", "v_proj"], **LORA)
    model = get_peft_model(model, lora)

    args = TrainingArguments(**training_arguments(output_dir, epochs, batch_size, bf16))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=sets["train"],
        eval_dataset=sets["validation"],  # no compute_metrics: evaluation computes the loss
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    trained = trainer.train()

    generation_started = time.perf_counter()
    tokenizer.padding_side = "left"  # the answers continue the prompts
    model = trainer.model.eval()
    answers: dict[str, list[str]] = {}
    generated_tokens = 0
    for name in ("validation", "hold_out"):
        # each prompt: the example's tokens before its labelled reply
        prompts = [{"input_ids": x["input_ids"][: x["labels"].count(-100)]} for x in sets[name]]
        answers[name] = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.pad(prompts[start : start + batch_size], return_tensors="pt")
            with torch.no_grad():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens or target_cap,
                    num_beams=1,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = output[:, batch["input_ids"].shape[1] :]  # after the prompts
            generated_tokens += int((new != tokenizer.pad_token_id).sum())
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers[name] += [a.strip() for a in texts]
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
        validation_loss=trainer.state.best_metric,
        output_dir=output_dir,
        started=started,
    )


if __name__ == "__main__":
    raise SystemExit(
        main(script=run, prog="python -m bench.peer_causal", description=__doc__.split("\n\n")[0])
    )
