"""The benchmark's dataset: ~400 support records with the length spread of a real support set.

Built deterministically from the example dataset: questions and answers are stitched from its
sentences to lengths drawn from log-normals. The work of a seq2seq model is set by tokens, so
the word lengths are chosen so that, with the benchmark's tokenizer (`training_texts`), the
token spread is the reference set's: questions median 99 tokens, mean 165, 95th percentile
about 512, longest 514 words; answers median 53 tokens, longest 111 words. (That tokenizer takes
fewer tokens per question word than flan-t5's, so questions come out at median 68 words.)
"""

import json
import re
from pathlib import Path

import numpy as np

QUESTION_WORDS = {"median": 72, "mean": 128, "max": 514}
ANSWER_WORDS = {"median": 33, "max": 111, "sigma": 0.45}
DATA_VERSION = "v2"  # names the cached dataset and model: v1 had answers of median 73 tokens
TOKENIZER_VOCABULARY = 2000  # learned pieces (the model's vocabulary is padded to 32128)


def _sentences(texts: list[str]) -> list[list[str]]:
    """The texts' sentences, each as a list of words."""
    return [
        s.split() for t in texts for s in re.split(r"(?<=[.!?])\s+", t.strip()) if len(s.split())
    ]


def _text_of_length(sentences: list[list[str]], words: int, rng: np.random.Generator) -> str:
    """Random sentences joined until `words` words, cut to exactly that many."""
    out: list[str] = []
    while len(out) < words:
        out.extend(sentences[rng.integers(len(sentences))])
    text = " ".join(out[:words])
    return text if text.endswith((".", "?", "!")) else text + "?"


def _lengths(n: int, median: float, sigma: float, low: int, high: int, rng) -> list[int]:
    """`n` log-normal lengths with the given median, clipped, the longest set to `high`."""
    lengths = np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), low, high)
    lengths[int(np.argmax(lengths))] = high
    return [int(x) for x in lengths]


def build_dataset(example_path: Path, out_path: Path, records: int = 400, seed: int = 0) -> Path:
    """Writes the benchmark dataset as a JSON list of {question, reply} to `out_path`."""
    rng = np.random.default_rng(seed)
    examples = json.loads(example_path.read_text(encoding="utf-8"))
    question_sentences = _sentences([r["question"] for r in examples])
    answer_sentences = _sentences([r["reply"] for r in examples])
    # mean / median = exp(sigma^2 / 2) for a log-normal
    q_sigma = float(np.sqrt(2 * np.log(QUESTION_WORDS["mean"] / QUESTION_WORDS["median"])))
    q_lengths = _lengths(records, QUESTION_WORDS["median"], q_sigma, 6, QUESTION_WORDS["max"], rng)
    a_lengths = _lengths(
        records, ANSWER_WORDS["median"], ANSWER_WORDS["sigma"], 4, ANSWER_WORDS["max"], rng
    )
    data = [
        {
            "question": _text_of_length(question_sentences, q, rng),
            "reply": _text_of_length(answer_sentences, a, rng).rstrip("?") + ".",
        }
        for q, a in zip(q_lengths, a_lengths, strict=True)
    ]
    out_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return out_path


def training_texts(data_path: Path) -> list[str]:
    """The texts the benchmark's tokenizer learns from: every question, and the answers
    repeated so that they weigh as many words as the questions (the answers' vocabulary is
    then learned as well as the questions', as a real tokenizer's would be)."""
    records = json.loads(data_path.read_text(encoding="utf-8"))
    questions = [r["question"] for r in records]
    answers = [r["reply"] for r in records]
    repeat = max(1, round(_words(questions) / max(1, _words(answers))))
    return questions + answers * repeat


def _words(texts: list[str]) -> int:
    """The number of words in `texts`."""
    return sum(len(t.split()) for t in texts)
