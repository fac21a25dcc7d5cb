"""The offline tiny models: a loadable T5 built by one command, and a tokenizer of each
family's own kind."""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianTokenizer

from finetune_module.tiny_model import FAMILIES
from tests.conftest import EXAMPLE_DATA, REPO


def test_command_builds_a_loadable_model_with_a_real_tokenizer(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_module.tiny_model",
            str(tmp_path / "m"),
            "--data",
            str(EXAMPLE_DATA),
            "--vocab-size",
            "300",
            "--d-model",
            "16",
            "--num-layers",
            "1",
            "--num-heads",
            "2",
            "--d-ff",
            "32",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "m"))
    assert model.config.d_model == 16 and model.config.vocab_size == len(tokenizer)
    text = "How do I fine-tune FLAN-T5 with LoRA on my own data?"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in ids
    assert len(ids) < len(text)  # learned pieces, not single characters


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_gets_a_tokenizer_of_its_own_kind(
    family: str, family_model: Callable[[str], Path]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(family_model(family))
    text = "How do I fine-tune FLAN-T5 with LoRA on my own data?"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in ids and len(ids) < len(text)
    assert tokenizer.eos_token_id is not None
    kind = FAMILIES[family].tokenizer_kind
    if family == "marian":  # OPUS-MT's SentencePiece files, read by the sentencepiece library
        assert isinstance(tokenizer, MarianTokenizer)
        return
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    assert pipeline["model"]["type"] == ("Unigram" if "Unigram" in kind else "BPE")
    assert ("ByteLevel" in json.dumps(pipeline["pre_tokenizer"])) == ("byte-level" in kind)
    assert bool(pipeline["model"].get("byte_fallback")) == ("byte fallback" in kind)
