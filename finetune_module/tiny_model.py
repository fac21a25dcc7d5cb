"""Build a small T5 with a real tokenizer on this machine, to run the whole job offline.

    python -m finetune_module.tiny_model ./tiny-t5 [--data example-support-dataset.json]
    python run.py --data example-support-dataset.json --model-id ./tiny-t5

The tokenizer is a SentencePiece-style Unigram model trained on the texts of the data file;
the model has random weights. It learns quickly but knows nothing beforehand: it is for trying
the pipeline and for tests, not for real answers.
"""

import argparse
import json
import string
import sys
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

from finetune_module.data import raw_records

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, pad_vocab_to: int | None = None
) -> T5Tokenizer:
    """A T5 tokenizer whose Unigram vocabulary is learned from `texts`.

    With `pad_vocab_to`, unused placeholder pieces fill the vocabulary up to that size (so a
    model with flan-t5's 32128-token vocabulary can be paired with a small learned one).
    """
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        unk_token="<unk>",
        initial_alphabet=list(string.printable.strip()),
    )
    unigram.train_from_iterator(texts, trainer)
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    vocab += [(f"<unused_{i}>", -1e9) for i in range(max(0, (pad_vocab_to or 0) - len(vocab)))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_t5(
    out_dir: str,
    texts: Iterable[str],
    vocab_size: int = 1000,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
    pad_vocab_to: int | None = None,
    d_kv: int | None = None,
) -> str:
    """Saves a randomly initialised T5 (flan-t5's architecture, any size) and its tokenizer
    to `out_dir` with `save_pretrained`; returns `out_dir`."""
    tokenizer = train_tokenizer(texts, vocab_size, pad_vocab_to)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv or d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def texts_of(data_path: str) -> list[str]:
    """Every string value of every record in a JSON or JSON Lines data file."""
    return [
        value
        for record in raw_records(data_path)
        if isinstance(record, dict)
        for value in record.values()
        if isinstance(value, str)
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line: build the tiny model into a directory."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune_module.tiny_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", help="directory to write the model and tokenizer to")
    parser.add_argument(
        "--data",
        default="example-support-dataset.json",
        help="JSON/JSONL file whose texts train the tokenizer (default: %(default)s)",
    )
    parser.add_argument("--vocab-size", type=int, default=1000, help="default: %(default)s")
    parser.add_argument("--d-model", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--num-layers", type=int, default=2, help="default: %(default)s")
    parser.add_argument("--num-heads", type=int, default=4, help="default: %(default)s")
    parser.add_argument("--d-ff", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    args = parser.parse_args(argv)
    build_t5(
        args.out_dir,
        texts_of(args.data),
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        d_ff=args.d_ff,
        seed=args.seed,
    )
    print(f"Wrote a tiny T5 and its tokenizer to {args.out_dir}; use --model-id {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
