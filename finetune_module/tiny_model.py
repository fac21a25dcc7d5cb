"""Build a small T5 (or GPT-2 / Llama) with a real tokenizer on this machine, to run offline.

    python -m finetune_module.tiny_model ./tiny-t5 [--data example-support-dataset.json]
    python run.py --data example-support-dataset.json --model-id ./tiny-t5
    python -m finetune_module.tiny_model ./tiny-gpt2 --arch gpt2     # a decoder-only model
    python run.py --data example-support-dataset.json --model-id ./tiny-gpt2 --model-type causal

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
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

from finetune_module.engine.sources import read_file_records

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5
ARCHITECTURES = ("t5", "gpt2", "llama")
# The special tokens of the decoder-only tokenizers, as their families name them; like the
# originals they have no padding token (the dataflow pads with the end-of-sequence token).
CAUSAL_SPECIAL_TOKENS = {
    "gpt2": {"unk": "<unk>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"},
    "llama": {"unk": "<unk>", "bos": "<s>", "eos": "</s>"},
}


def _train_unigram(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A Unigram tokenizer (NFKC, Metaspace) learned from `texts`; `special_tokens` first."""
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        unk_token="<unk>",
        initial_alphabet=list(string.printable.strip()),
    )
    unigram.train_from_iterator(texts, trainer)
    return unigram


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, pad_vocab_to: int | None = None
) -> T5Tokenizer:
    """A T5 tokenizer whose Unigram vocabulary is learned from `texts`.

    With `pad_vocab_to`, unused placeholder pieces fill the vocabulary up to that size (so a
    model with flan-t5's 32128-token vocabulary can be paired with a small learned one).
    """
    unigram = _train_unigram(texts, vocab_size, SPECIAL_TOKENS)
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
    return _save_random_model(T5ForConditionalGeneration, config, tokenizer, out_dir, seed)


def train_causal_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, arch: str = "gpt2"
) -> PreTrainedTokenizerFast:
    """A decoder-only tokenizer learned from `texts`, with the special tokens of `arch`:
    GPT-2's `<|endoftext|>` (added nowhere), or Llama's `<s>` (put first) and `</s>`."""
    special = CAUSAL_SPECIAL_TOKENS[arch]
    unigram = _train_unigram(texts, vocab_size, list(dict.fromkeys(special.values())))
    if arch == "llama":
        unigram.post_processor = processors.TemplateProcessing(
            single=f"{special['bos']} $A",
            special_tokens=[(special["bos"], unigram.token_to_id(special["bos"]))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=unigram,
        unk_token=special["unk"],
        bos_token=special["bos"],
        eos_token=special["eos"],
    )


def build_causal(
    out_dir: str,
    texts: Iterable[str],
    arch: str = "gpt2",
    vocab_size: int = 1000,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
) -> str:
    """Saves a randomly initialised decoder-only model (GPT-2 or Llama architecture, any size)
    and its tokenizer to `out_dir` with `save_pretrained`; returns `out_dir`."""
    tokenizer = train_causal_tokenizer(texts, vocab_size, arch)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "gpt2":
        model_class: type[PreTrainedModel] = GPT2LMHeadModel
        config: PretrainedConfig = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=1024,
            n_embd=d_model,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=d_ff,
            **ids,
        )
    else:
        model_class = LlamaForCausalLM
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            hidden_size=d_model,
            intermediate_size=d_ff,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            tie_word_embeddings=False,
            **ids,
        )
    return _save_random_model(model_class, config, tokenizer, out_dir, seed)


def _save_random_model(
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str,
    seed: int,
) -> str:
    """Saves a randomly initialised `model_class(config)` and `tokenizer` to `out_dir` with
    `save_pretrained`; returns `out_dir`."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def texts_of(data_path: str) -> list[str]:
    """Every string value of every record in a data file (any format the data stage reads)."""
    return [
        value
        for record in read_file_records(data_path)
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
        "--arch",
        choices=ARCHITECTURES,
        default="t5",
        help="t5 (sequence-to-sequence, default) or gpt2 / llama (decoder-only: use them with "
        "--model-type causal)",
    )
    parser.add_argument(
        "--data",
        default="example-support-dataset.json",
        help="data file whose texts train the tokenizer (default: %(default)s)",
    )
    parser.add_argument("--vocab-size", type=int, default=1000, help="default: %(default)s")
    parser.add_argument("--d-model", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--num-layers", type=int, default=2, help="default: %(default)s")
    parser.add_argument("--num-heads", type=int, default=4, help="default: %(default)s")
    parser.add_argument("--d-ff", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    args = parser.parse_args(argv)
    sizes = {
        "vocab_size": args.vocab_size,
        "d_model": args.d_model,
        "num_layers": args.num_layers,
        "num_heads": args.num_heads,
        "d_ff": args.d_ff,
        "seed": args.seed,
    }
    use = f"--model-id {args.out_dir}"
    if args.arch == "t5":
        build_t5(args.out_dir, texts_of(args.data), **sizes)
    else:
        build_causal(args.out_dir, texts_of(args.data), args.arch, **sizes)
        use += " --model-type causal"
    print(f"Wrote a tiny {args.arch} and its tokenizer to {args.out_dir}; use {use}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
