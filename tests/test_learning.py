"""Proof that the dataflow learns: on a synthetic task a tiny model trained through the public
contract must answer well, which random-weight smoke runs cannot show. A shifted label, a
wrong mask, a wrong decoder start token or the wrong checkpoint loaded as the best one all
break these thresholds.

The task: each question names one of four topics among filler words, and the answer is that
topic's fixed sentence. The tiny models start from random weights, so the base model scores
about 0; thresholds were set from measured runs (seeds 1 to 3 and the default), with margin:

| family, training | measured ROUGE-L (validation / hold-out) | asserted |
|---|---|---|
| T5, full | 91.5-96.1 / 94.1-98.8 | >= 80 on each set |
| T5, LoRA (q, v) | gain 38.6-65.6 / 49.1-70.7 | mean gain >= 30 |
| Llama, full | 100 / 98.9-100 | >= 80 on each set |
| Llama, LoRA (q_proj, v_proj) | gain 97.4 / 94.8 | mean gain >= 80 |

A LoRA run that learns one sentence for every question (no routing by topic) scores about 20
to 25, below the T5 threshold.
"""

import json
import random
from pathlib import Path
from typing import Any

import pytest

import finetune_module
from finetune_module.tiny_model import Sizes, build

TOPICS = {
    "billing": "Refunds reach your card within five days.",
    "password": "Use the reset link on the sign in page.",
    "shipping": "Parcels arrive three days after your order.",
    "privacy": "You can delete your data from settings.",
}
FILLER = [
    "hello",
    "please",
    "i",
    "need",
    "some",
    "help",
    "with",
    "my",
    "question",
    "about",
    "the",
    "thing",
    "today",
    "thanks",
    "again",
    "kind",
    "regards",
    "quick",
    "note",
    "here",
]


def topic_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` questions of seven filler words with a topic's name among them, each answered
    with the topic's sentence."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        topic = rng.choice(sorted(TOPICS))
        words = rng.sample(FILLER, 7)
        words.insert(rng.randrange(len(words) + 1), topic)
        records.append({"question": " ".join(words), "reply": TOPICS[topic]})
    return records


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("topics") / "topics.json"
    path.write_text(json.dumps(topic_records(160)), encoding="utf-8")
    return path


def _learn(
    family: str, data: Path, tmp_path: Path, *, lora: bool, **inputs: Any
) -> dict[str, dict[str, dict[str, float]]]:
    """Trains a fresh tiny model of `family` on the data; returns base and fine-tuned scores
    per set (`base_vs_finetuned_metrics`)."""
    records = json.loads(data.read_text(encoding="utf-8"))
    texts = [text for record in records for text in record.values()]
    model_dir = build(str(tmp_path / "model"), texts, family, Sizes(300, 64, 2, 4, 128))
    config = {"model_type": "seq2seq" if family == "t5" else "causal"}
    if not lora:
        config["use_lora"] = False
    dr = finetune_module.build_driver("base", **config)
    result = dr.execute(
        ["base_vs_finetuned_metrics"],
        inputs={
            "data_path": str(data),
            "input_text_key": "question",
            "output_text_key": "reply",
            "model_id": model_dir,
            "output_dir": str(tmp_path / "run"),
            "train_size": 0.7,  # 112 to train on, 24 to validate, 24 held out
            "validation_size": 0.5,
            "quiet": True,
            **inputs,
        },
    )
    return result["base_vs_finetuned_metrics"]


def _rouge_l(scores: dict[str, dict[str, dict[str, float]]], model: str) -> dict[str, float]:
    return {name: by_model[model]["rougeL"] for name, by_model in scores.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_full_finetuning_learns_the_topic_answers(
    family: str, topic_data: Path, tmp_path: Path
) -> None:
    scores = _learn(family, topic_data, tmp_path, lora=False, num_train_epochs=10,
                    learning_rate=3e-3)  # fmt: skip
    finetuned = _rouge_l(scores, "finetuned")
    assert min(finetuned.values()) >= 80, finetuned


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "inputs", "threshold"),
    [
        # a constant rate: the adapter on a random T5 learns the routing by topic slowly
        ("t5", {"num_train_epochs": 20, "learning_rate": 5e-3,
                "extra_training_args": {"lr_scheduler_type": "constant"}}, 30),
        ("llama", {"num_train_epochs": 30, "learning_rate": 1e-2}, 80),
    ],
)  # fmt: skip
def test_lora_gains_clearly_over_the_base_model(
    family: str, inputs: dict[str, Any], threshold: float, topic_data: Path, tmp_path: Path
) -> None:
    scores = _learn(family, topic_data, tmp_path, lora=True, **inputs)
    gains = {name: by_model["gain"]["rougeL"] for name, by_model in scores.items()}
    assert sum(gains.values()) / len(gains) >= threshold, (gains, _rouge_l(scores, "base"))


def test_the_task_needs_the_topic_word(topic_data: Path) -> None:
    """Each answer follows from the topic named in the question and from nothing else."""
    records = json.loads(topic_data.read_text(encoding="utf-8"))
    for record in records:
        named = [topic for topic in TOPICS if topic in record["question"].split()]
        assert len(named) == 1 and record["reply"] == TOPICS[named[0]]
    assert {record["reply"] for record in records} == set(TOPICS.values())
