"""Python's garbage collector is kept off the objects alive before the work that makes objects
by the thousand (`engine/collector.py`): loading a tokenizer or model, the Trainer's training,
the report's figures."""

import gc
from pathlib import Path
from typing import Any

import pytest

from finetune_module.engine import collector, html_report, loading
from tests.test_report import _minimal_report


def test_a_block_freezes_what_is_alive_and_gives_it_back() -> None:
    """(Frozen objects that are freed leave the frozen generation, so within a block its count
    may only shrink; a freeze of more objects would grow it.)"""
    assert gc.get_freeze_count() == 0
    with collector.objects_alive_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the libraries' objects, at least
        made = [[] for _ in range(1000)]  # made within the block: not frozen
        with collector.objects_alive_frozen():  # an enclosing block's freeze stays as it is
            assert 0 < gc.get_freeze_count() <= frozen
        assert 0 < gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0 and len(made) == 1000


def test_a_program_s_own_freeze_is_left_as_it_is() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        made = [[] for _ in range(1000)]
        with collector.objects_alive_frozen():
            assert 0 < gc.get_freeze_count() <= frozen  # nothing more frozen
        assert 0 < gc.get_freeze_count() <= frozen  # and the program's freeze not undone
        assert len(made) == 1000
    finally:
        gc.unfreeze()


def test_loading_runs_with_the_objects_alive_frozen(tmp_path: Path) -> None:
    seen = loading.load_pretrained(lambda model_id, **_: gc.get_freeze_count(), str(tmp_path))
    assert seen > 10_000  # the libraries' objects, left out of the collector's passes
    assert gc.get_freeze_count() == 0


def test_the_report_s_figures_are_made_with_the_objects_alive_frozen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, int] = {}
    for name in ("loss_figure", "scores_figure", "lengths_figure"):
        made = getattr(html_report, name)

        def counting(*args: Any, made: Any = made, name: str = name) -> str:
            seen[name] = gc.get_freeze_count()
            return made(*args)

        monkeypatch.setattr(html_report, name, counting)
    page = _minimal_report()
    assert "Loss curves" in page
    assert len(seen) == 3 and min(seen.values()) > 10_000, seen
    assert gc.get_freeze_count() == 0
