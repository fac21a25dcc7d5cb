"""Build a small model of any supported family, with a tokenizer of the family's own kind
trained on this machine, to run offline.

    python -m finetune_module.tiny_model ./tiny-t5 [--data example-support-dataset.json]
    python run.py --data example-support-dataset.json --model-id ./tiny-t5
    python -m finetune_module.tiny_model ./tiny-qwen --family qwen3    # a decoder-only model
    python run.py --data example-support-dataset.json --model-id ./tiny-qwen --model-type causal

`FAMILIES` lists the families. Each tokenizer is of the kind the family's released models use
(SentencePiece Unigram for T5, mT5, mBART, Marian and Pegasus; byte-level BPE for BART, GPT-2,
Qwen, GPT-NeoX and OPT; SentencePiece-style BPE with byte fallback for Llama, Mistral, Phi-3
and Gemma), with the family's special tokens and tokenizer class, learned from the texts of
the data file. The model has random weights: it learns quickly but knows nothing beforehand.
It is for trying the pipeline and for tests, not for real answers.
"""

import argparse
import dataclasses
import io
import json
import os
import string
import sys
import tempfile
from collections.abc import Callable, Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartTokenizer,
    Gemma3TextConfig,
    GemmaTokenizer,
    GPT2Config,
    GPT2Tokenizer,
    GPTNeoXConfig,
    GPTNeoXTokenizer,
    LlamaConfig,
    LlamaTokenizer,
    M2M100Config,
    MarianConfig,
    MarianTokenizer,
    MBartConfig,
    MBartTokenizer,
    MistralConfig,
    MT5Config,
    NllbTokenizer,
    OPTConfig,
    PegasusConfig,
    PegasusTokenizer,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen3Config,
    T5Config,
    T5Tokenizer,
)

from finetune_module.engine.sources import read_file_records

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5
_ALPHABET = list(string.printable.strip())
_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # SentencePiece's byte fallback pieces
MBART_LANGUAGE = "en_XX"  # the tiny mBART's source and target language code
NLLB_LANGUAGE = "eng_Latn"  # the tiny NLLB's


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shape of a tiny model: vocabulary, width, depth (each side), heads, feed-forward."""

    vocab_size: int = 1000
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128


# --- tokenizers ----------------------------------------------------------------------------------


def _unigram_pieces(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str]
) -> list[tuple[str, float]]:
    """A Unigram vocabulary (pieces and log-probabilities, `special_tokens` first) learned from
    `texts` after NFKC and Metaspace, as SentencePiece's Unigram models hold it."""
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        unk_token="<unk>",
        initial_alphabet=_ALPHABET,
    )
    unigram.train_from_iterator(texts, trainer)
    return [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]


def _bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    byte_level: bool,
    byte_fallback: bool = True,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary and its merges learned from `texts` (`special_tokens` first): over
    bytes as GPT-2 does (`byte_level`), else over Metaspace words as SentencePiece does, with
    its 256 byte pieces for characters outside the vocabulary (`byte_fallback`: Llama, Gemma;
    NLLB has none)."""
    bpe = Tokenizer(models.BPE())
    if byte_level:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        bpe.pre_tokenizer = pre_tokenizers.Metaspace()
        special_tokens = [*special_tokens, *(_BYTE_TOKENS if byte_fallback else [])]
        alphabet = [*_ALPHABET, "\u2581"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(special_tokens),
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    return learned["vocab"], merges


def _t5_tokenizer(texts: list[str], vocab_size: int) -> T5Tokenizer:
    return train_tokenizer(texts, vocab_size)


def _pegasus_tokenizer(texts: list[str], vocab_size: int) -> PegasusTokenizer:
    # Pegasus: padding 0, end 1, two mask tokens, then 101 reserved <unk_N> pieces, then <unk>
    reserved = ["<pad>", "</s>", "<mask_1>", "<mask_2>", *(f"<unk_{i}>" for i in range(2, 103))]
    return PegasusTokenizer(vocab=_unigram_pieces(texts, vocab_size, [*reserved, "<unk>"]))


def _mbart_tokenizer(texts: list[str], vocab_size: int) -> MBartTokenizer:
    pieces = _unigram_pieces(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>"])
    return MBartTokenizer(vocab=pieces, src_lang=MBART_LANGUAGE, tgt_lang=MBART_LANGUAGE)


def _marian_tokenizer(texts: list[str], vocab_size: int) -> MarianTokenizer:
    """Marian's tokenizer: a SentencePiece model (one for both sides) and a vocabulary file
    that numbers its pieces, with </s> 0, <unk> 1 and <pad> last, as OPUS-MT's models do."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        unk_id=1,
        eos_id=0,
        bos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    vocab["<pad>"] = len(vocab)
    with tempfile.TemporaryDirectory() as scratch:
        spm = os.path.join(scratch, "source.spm")
        with open(spm, "wb") as f:
            f.write(model.getvalue())
        vocab_file = os.path.join(scratch, "vocab.json")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        return MarianTokenizer(spm, spm, vocab_file)  # reads the files now


def _nllb_tokenizer(texts: list[str], vocab_size: int) -> NllbTokenizer:
    # NLLB: SentencePiece BPE; each text starts with its language code and ends with </s>
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab, merges = _bpe(texts, vocab_size, specials, byte_level=False, byte_fallback=False)
    return NllbTokenizer(vocab=vocab, merges=merges, src_lang=NLLB_LANGUAGE, tgt_lang=NLLB_LANGUAGE)


def _bart_tokenizer(texts: list[str], vocab_size: int) -> BartTokenizer:
    vocab, merges = _bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], True)
    return BartTokenizer(vocab=vocab, merges=merges)


def _gpt2_tokenizer(texts: list[str], vocab_size: int) -> GPT2Tokenizer:
    vocab, merges = _bpe(texts, vocab_size, ["<|endoftext|>"], True)
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def _opt_tokenizer(texts: list[str], vocab_size: int) -> GPT2Tokenizer:
    # OPT: GPT-2's byte-level BPE, with <s>, <pad>, </s>, <unk> first and </s> put before a text
    vocab, merges = _bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>"], True)
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def _neox_tokenizer(texts: list[str], vocab_size: int) -> GPTNeoXTokenizer:
    vocab, merges = _bpe(texts, vocab_size, ["<|endoftext|>", "<|padding|>"], True)
    return GPTNeoXTokenizer(vocab=vocab, merges=merges)


def _qwen_tokenizer(texts: list[str], vocab_size: int) -> Qwen2Tokenizer:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, merges = _bpe(texts, vocab_size, specials, True)
    return Qwen2Tokenizer(vocab=vocab, merges=merges)


def _llama_tokenizer(texts: list[str], vocab_size: int) -> LlamaTokenizer:
    vocab, merges = _bpe(texts, vocab_size, ["<unk>", "<s>", "</s>"], False)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _phi3_tokenizer(texts: list[str], vocab_size: int) -> LlamaTokenizer:
    # Phi-3: Llama's tokenizer, ending texts with <|endoftext|>
    vocab, merges = _bpe(texts, vocab_size, ["<unk>", "<s>", "</s>", "<|endoftext|>"], False)
    return LlamaTokenizer(vocab=vocab, merges=merges, eos_token="<|endoftext|>", add_bos_token=True)


def _gemma_tokenizer(texts: list[str], vocab_size: int) -> GemmaTokenizer:
    vocab, merges = _bpe(texts, vocab_size, ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], False)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, pad_vocab_to: int | None = None
) -> T5Tokenizer:
    """A T5 tokenizer whose Unigram vocabulary is learned from `texts`.

    With `pad_vocab_to`, unused placeholder pieces fill the vocabulary up to that size (so a
    model with flan-t5's 32128-token vocabulary can be paired with a small learned one).
    """
    vocab = _unigram_pieces(texts, vocab_size, SPECIAL_TOKENS)
    vocab += [(f"<unused_{i}>", -1e9) for i in range(max(0, (pad_vocab_to or 0) - len(vocab)))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


# --- model configurations ------------------------------------------------------------------------


def _ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The tokenizer's beginning, end and padding token ids (None where it has none), as
    configs name them."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _t5_config(config_class: type[PretrainedConfig]) -> Callable[..., PretrainedConfig]:
    def config(tokenizer: PreTrainedTokenizerBase, s: Sizes, **extra: int) -> PretrainedConfig:
        return config_class(
            vocab_size=len(tokenizer),
            d_model=s.d_model,
            d_kv=extra.get("d_kv") or s.d_model // s.num_heads,
            d_ff=s.d_ff,
            num_layers=s.num_layers,
            num_decoder_layers=s.num_layers,
            num_heads=s.num_heads,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )

    return config


def _bart_like_config(
    config_class: type[PretrainedConfig], start: str
) -> Callable[..., PretrainedConfig]:
    """A config builder for the BART-shaped families; the decoder starts with the token
    `start` names: "eos" (BART, NLLB), "pad" (Marian, Pegasus) or "language" (mBART's language)."""

    def config(tokenizer: PreTrainedTokenizerBase, s: Sizes, **_: int) -> PretrainedConfig:
        starts = {
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "language": tokenizer.convert_tokens_to_ids(MBART_LANGUAGE),
        }
        ids = _ids(tokenizer)
        if config_class is PegasusConfig:
            ids.pop("bos_token_id")
        return config_class(
            vocab_size=len(tokenizer),
            d_model=s.d_model,
            encoder_layers=s.num_layers,
            decoder_layers=s.num_layers,
            encoder_attention_heads=s.num_heads,
            decoder_attention_heads=s.num_heads,
            encoder_ffn_dim=s.d_ff,
            decoder_ffn_dim=s.d_ff,
            max_position_embeddings=1024,
            encoder_layerdrop=0.0,  # as the released models (M2M100's default is 0.05)
            decoder_layerdrop=0.0,
            decoder_start_token_id=starts[start],
            forced_eos_token_id=tokenizer.eos_token_id,
            **ids,
        )

    return config


def _decoder_config(
    config_class: type[PretrainedConfig], grouped: bool = True, **fixed: object
) -> Callable[..., PretrainedConfig]:
    """A config builder for the Llama-shaped decoder-only families (Llama, Mistral, Qwen,
    Phi-3, Gemma): `grouped`, two query heads share each key/value head, as in the released
    models; `fixed` holds settings of the family."""

    def config(tokenizer: PreTrainedTokenizerBase, s: Sizes, **_: int) -> PretrainedConfig:
        return config_class(
            vocab_size=len(tokenizer),
            hidden_size=s.d_model,
            intermediate_size=s.d_ff,
            num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_heads,
            num_key_value_heads=max(1, s.num_heads // 2) if grouped else s.num_heads,
            max_position_embeddings=1024,
            **_ids(tokenizer),
            **fixed,
        )

    return config


def _gpt2_config(tokenizer: PreTrainedTokenizerBase, s: Sizes, **_: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=s.d_model,
        n_layer=s.num_layers,
        n_head=s.num_heads,
        n_inner=s.d_ff,
        **_ids(tokenizer),
    )


def _neox_config(tokenizer: PreTrainedTokenizerBase, s: Sizes, **_: int) -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.d_model,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        intermediate_size=s.d_ff,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
        **_ids(tokenizer),
    )


def _opt_config(tokenizer: PreTrainedTokenizerBase, s: Sizes, **_: int) -> PretrainedConfig:
    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.d_model,
        word_embed_proj_dim=s.d_model,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        ffn_dim=s.d_ff,
        max_position_embeddings=1024,
        **_ids(tokenizer),
    )


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family the tiny builder makes: its kind, tokenizer and configuration."""

    kind: str  # "seq2seq" or "causal" (the dataflow's model_type)
    tokenizer: Callable[[list[str], int], PreTrainedTokenizerBase]
    config: Callable[..., PretrainedConfig]
    tokenizer_kind: str  # the kind of tokenizer, in words


_UNIGRAM = "SentencePiece Unigram"
_BYTE_BPE = "byte-level BPE"
_SP_BPE = "SentencePiece BPE with byte fallback"

#: The families, by the name `--family` takes (the released models' config model_type, but
#: "gemma3" for Gemma 3's text model and "nllb" for NLLB's m2m_100).
FAMILIES: dict[str, Family] = {
    "t5": Family("seq2seq", _t5_tokenizer, _t5_config(T5Config), _UNIGRAM),
    "mt5": Family("seq2seq", _t5_tokenizer, _t5_config(MT5Config), _UNIGRAM),
    "bart": Family("seq2seq", _bart_tokenizer, _bart_like_config(BartConfig, "eos"), _BYTE_BPE),
    "mbart": Family(
        "seq2seq", _mbart_tokenizer, _bart_like_config(MBartConfig, "language"), _UNIGRAM
    ),
    "marian": Family(
        "seq2seq", _marian_tokenizer, _bart_like_config(MarianConfig, "pad"), _UNIGRAM
    ),
    "pegasus": Family(
        "seq2seq", _pegasus_tokenizer, _bart_like_config(PegasusConfig, "pad"), _UNIGRAM
    ),
    "nllb": Family(
        "seq2seq", _nllb_tokenizer, _bart_like_config(M2M100Config, "eos"), "SentencePiece BPE"
    ),
    "gpt2": Family("causal", _gpt2_tokenizer, _gpt2_config, _BYTE_BPE),
    "llama": Family(
        "causal",
        _llama_tokenizer,
        _decoder_config(LlamaConfig, grouped=False, tie_word_embeddings=False),
        _SP_BPE,
    ),
    "mistral": Family("causal", _llama_tokenizer, _decoder_config(MistralConfig), _SP_BPE),
    "qwen2": Family(
        "causal", _qwen_tokenizer, _decoder_config(Qwen2Config, tie_word_embeddings=True), _BYTE_BPE
    ),
    "qwen3": Family(
        "causal", _qwen_tokenizer, _decoder_config(Qwen3Config, tie_word_embeddings=True), _BYTE_BPE
    ),
    "phi3": Family("causal", _phi3_tokenizer, _decoder_config(Phi3Config), _SP_BPE),
    "gemma3": Family(
        "causal",
        _gemma_tokenizer,
        _decoder_config(Gemma3TextConfig, sliding_window=64, tie_word_embeddings=True),
        _SP_BPE,
    ),
    "gpt_neox": Family("causal", _neox_tokenizer, _neox_config, _BYTE_BPE),
    "opt": Family("causal", _opt_tokenizer, _opt_config, _BYTE_BPE),
}


# --- building ------------------------------------------------------------------------------------


def _save(
    kind: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, out_dir: str, seed: int
) -> str:
    """Saves a model of `config` with random weights (drawn from `seed`) and the tokenizer to
    `out_dir` with `save_pretrained`; returns `out_dir`."""
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build(
    out_dir: str,
    texts: Iterable[str],
    family: str = "t5",
    sizes: Sizes = Sizes(),
    seed: int = 0,
) -> str:
    """Saves a randomly initialised model of `family` with `sizes`, and a tokenizer of the
    family's kind learned from `texts`, to `out_dir` with `save_pretrained`; returns
    `out_dir`."""
    chosen = FAMILIES[family]
    tokenizer = chosen.tokenizer(list(texts), sizes.vocab_size)
    return _save(chosen.kind, chosen.config(tokenizer, sizes), tokenizer, out_dir, seed)


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
    """Saves a randomly initialised T5 (flan-t5's architecture, any size; `d_kv` the width
    of each attention head) and its tokenizer to `out_dir` with `save_pretrained`; returns
    `out_dir`. With `pad_vocab_to`, the vocabulary is padded to that size (see
    `train_tokenizer`)."""
    sizes = Sizes(vocab_size, d_model, num_layers, num_heads, d_ff)
    tokenizer = train_tokenizer(texts, vocab_size, pad_vocab_to)
    config = _t5_config(T5Config)(tokenizer, sizes, d_kv=d_kv)
    return _save("seq2seq", config, tokenizer, out_dir, seed)


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
    """Saves a randomly initialised decoder-only model of the family `arch` and its tokenizer
    to `out_dir` with `save_pretrained`; returns `out_dir`."""
    sizes = Sizes(vocab_size, d_model, num_layers, num_heads, d_ff)
    return build(out_dir, texts, arch, sizes, seed)


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
        "--family",
        "--arch",
        choices=FAMILIES,
        default="t5",
        help="the model family (default: %(default)s); "
        + ", ".join(f"{name} ({f.kind})" for name, f in FAMILIES.items())
        + ". Use a causal one with --model-type causal.",
    )
    parser.add_argument(
        "--data",
        default="example-support-dataset.json",
        help="data file whose texts train the tokenizer (default: %(default)s)",
    )
    defaults = Sizes()
    for field in dataclasses.fields(Sizes):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, field.name),
                            help="default: %(default)s")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    args = parser.parse_args(argv)
    sizes = Sizes(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Sizes)})
    build(args.out_dir, texts_of(args.data), args.family, sizes, args.seed)
    use = f"--model-id {args.out_dir}"
    if FAMILIES[args.family].kind == "causal":
        use += " --model-type causal"
    print(f"Wrote a tiny {args.family} and its tokenizer to {args.out_dir}; use {use}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
