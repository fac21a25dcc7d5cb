"""The documentation: the site builds in strict mode (a broken link, an unknown anchor, a page
left out of the nav or any other warning fails), with its generated parts (the API reference
from the docstrings, the command-line reference from the parsers, the DAG pictures); and the
README stays short and keeps the test command that CI runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
TEST_COMMAND_MARKER = "<!-- test-command -->"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation site, built with `mkdocs build --strict` into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", out]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its successor
    built = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert built.returncode == 0, built.stderr[-5000:]
    return out


def test_api_reference_documents_the_nodes_from_their_docstrings(site: Path) -> None:
    page = (site / "reference" / "stages" / "training" / "index.html").read_text()
    assert "fitted_weights" in page
    assert "The trained weights" in page  # the start of the node's docstring
    assert "build_driver" in (site / "reference" / "package" / "index.html").read_text()
    assert "build_model" in (site / "reference" / "engine" / "index.html").read_text()


def test_cli_reference_lists_the_flags(site: Path) -> None:
    page = (site / "reference" / "cli" / "index.html").read_text()
    assert "--num_train_epochs" in page


def test_dag_pictures_are_drawn(site: Path) -> None:
    for name in ("base", "presaved", "training"):
        assert "<svg" in (site / "dag" / f"{name}.svg").read_text()
    assert "dag/base.svg" in (site / "dataflow" / "index.html").read_text()


def test_readme_is_short_and_keeps_the_test_command() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    # .ci/run runs the one line inside the fence that follows the marker
    start = lines.index(TEST_COMMAND_MARKER)
    assert lines[start + 1].startswith("```")
    assert "pytest" in lines[start + 2]
    assert lines[start + 3] == "```"


def test_readme_links_to_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    assert "docs/getting-started.md" in targets
    assert [target for target in targets if not (REPO / target).exists()] == []
