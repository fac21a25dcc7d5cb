"""The Hugging Face Hub from the loader's side: a hub that does not answer is asked once, with a
short timeout, and what the local cache holds still loads; a local directory never asks."""

import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoConfig

from finetune_module.engine import loading
from finetune_module.errors import ModelNotAvailableError
from tests.conftest import SilentHub


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE unset, as huggingface_hub read it when the suite imported it. (Each test
    has hubs of its own, on new ports: no answer remembered from another test applies.)"""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(loading.hub_constants, "HF_HUB_OFFLINE", False)


def test_a_silent_hub_is_asked_once_with_a_short_timeout(
    silent_hub: SilentHub, failing_hub: str, online: None
) -> None:
    began = time.monotonic()
    assert not loading.hub_answers(silent_hub.url)
    assert loading.HUB_PROBE_TIMEOUT_S <= time.monotonic() - began < 3 * loading.HUB_PROBE_TIMEOUT_S
    assert not loading.hub_answers(silent_hub.url)  # remembered: no second wait
    assert silent_hub.requests == ["HEAD / HTTP/1.1"]
    assert loading.hub_answers(failing_hub)  # any HTTP answer is an answer


def _in_hub_cache(model_dir: Path, cache: Path, repo_id: str) -> None:
    """Puts a saved model in a Hugging Face cache as a download of `repo_id` would."""
    repo, commit = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_silent_hub_loads_what_is_cached_and_names_what_is_not(
    tiny_model_dir: Path,
    silent_hub: SilentHub,
    online: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(loading.hub_constants, "ENDPOINT", silent_hub.url)
    _in_hub_cache(tiny_model_dir, tmp_path, "someone/tiny-t5")
    config = loading.load_pretrained(
        AutoConfig.from_pretrained, "someone/tiny-t5", cache_dir=str(tmp_path)
    )
    assert config.d_model == 32
    with pytest.raises(ModelNotAvailableError) as error:
        loading.load_pretrained(AutoConfig.from_pretrained, "someone/else", cache_dir=str(tmp_path))
    assert f"the Hugging Face Hub ({silent_hub.url}) did not answer within 5 s" in str(error.value)
    # one probe, and no request for a model waited on the silent hub
    assert silent_hub.requests.count("HEAD / HTTP/1.1") == 1
    assert not [request for request in silent_hub.requests if "someone" in request]


def test_a_local_directory_never_asks_the_hub(
    tiny_model_dir: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def asked(endpoint: str | None = None) -> bool:
        raise AssertionError("the hub was asked about a local directory")

    monkeypatch.setattr(loading, "hub_answers", asked)
    config = loading.load_pretrained(AutoConfig.from_pretrained, str(tiny_model_dir))
    assert config.d_model == 32
