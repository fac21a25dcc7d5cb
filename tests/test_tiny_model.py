"""The offline tiny model: a real tokenizer and a loadable T5, built by one command."""

import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

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
