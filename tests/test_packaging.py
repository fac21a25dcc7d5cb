"""The package as users install it: pyproject's dependency ranges against the pinned lock
(requirements*.txt), the wheel installed into a fresh virtual environment running the tiny
fine-tune from a directory outside the repository, and the Hamilton dataflow hub's files."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import finetune_module
from tests.conftest import EXAMPLE_DATA, QUICK, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])

#: Each lock file -> the groups of pyproject ranges it pins ("dependencies" or an extra's name).
LOCKS = {
    "requirements.txt": ("dependencies",),
    "requirements-extras.txt": ("sql", "parquet", "datasets", "mlflow", "ui", "sweep"),
    "requirements-gpu.txt": ("gpu",),
    "requirements-dev.txt": ("dev", "docs"),
}

#: What building the package reads (the Dockerfile copies the same).
BUILD_INPUTS = ("pyproject.toml", "README.md", "finetune_module")

#: The files of the Hamilton dataflow hub's conventions that ship inside the package.
HUB_FILES = ("tags.json", "valid_configs.jsonl")

# A user's run file: the guide's example, run from its own directory with the installed package.
RUN_FILE = """\
import importlib.resources
import importlib.util
import json
import sys

from hamilton import driver

import finetune_module

dr = driver.Builder().with_config({"start": "base"}).with_modules(*finetune_module.MODULES).build()
result = dr.execute(
    ["save_best_models", "hold_out_set_predictions",
     "training_and_validation_set_metrics", "finetuned_model_on_validation_set"],
    inputs=json.loads(sys.argv[1]),
)
package = importlib.resources.files("finetune_module")
print(json.dumps({
    "package": finetune_module.__file__,
    "saved": str(result["save_best_models"]),
    "hold_out": len(result["hold_out_set_predictions"]),
    "importable": {name: importlib.util.find_spec(name) is not None for name in ("bench", "tests")},
    "hub_files": sorted(name for name in sys.argv[2:] if package.joinpath(name).is_file()),
}))
"""


def _lock_lines(path: Path) -> tuple[list[str], list[Path]]:
    """The requirement lines of a requirements file and the files it includes with `-r`."""
    lines, included = [], []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r"):
            included.append(path.parent / line[2:].strip())
        elif line and not line.startswith("-"):
            lines.append(line)
    return lines, included


def _pins(path: Path, *, own_only: bool = False) -> dict[str, str]:
    """The pinned versions (canonical name -> version) of a lock file, with those of the files it
    includes unless `own_only`; a line that is not an exact `==` pin fails the test."""
    lines, included = _lock_lines(path)
    pins = {} if own_only else {k: v for f in included for k, v in _pins(f).items()}
    for line in lines:
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {line} is not a pin"
        pins[canonicalize_name(requirement.name)] = specs[0].version
    return pins


def _ranges(groups: tuple[str, ...]) -> dict[str, Requirement]:
    """The ranges (canonical name -> requirement) of pyproject's groups ("dependencies" or
    extras), with the extras that a group names of the project itself (`finetune-module[sql]`)."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    ranges: dict[str, Requirement] = {}
    for group in groups:
        lines = PYPROJECT["project"]["dependencies"] if group == "dependencies" else extras[group]
        for requirement in map(Requirement, lines):
            if canonicalize_name(requirement.name) == PROJECT:
                ranges |= _ranges(tuple(sorted(requirement.extras)))
            else:
                ranges[canonicalize_name(requirement.name)] = requirement
    return ranges


def _requirements_of(requirement: Requirement) -> set[str]:
    """The canonical names of what an installed package requires, with the requirement's extras
    (`psycopg[binary]` -> psycopg-binary)."""
    names = set()
    for line in metadata.requires(requirement.name) or []:
        needed = Requirement(line)
        extras = sorted(requirement.extras) or [""]
        if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
            names.add(canonicalize_name(needed.name))
    return names


def _installed(name: str) -> bool:
    """Whether a distribution is installed here."""
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("lock", list(LOCKS))
def test_lock_pins_every_range_within_it(lock: str) -> None:
    ranges = _ranges(LOCKS[lock])
    pins = _pins(REPO / lock)
    missing = sorted(set(ranges) - set(pins))
    outside = [
        f"{name}=={pins[name]} (range {requirement.specifier})"
        for name, requirement in sorted(ranges.items())
        if name in pins and not requirement.specifier.contains(pins[name], prereleases=True)
    ]
    # a pin with no range is allowed only for a package that a ranged one requires (the lock
    # pins the whole environment: narwhals for plotly, psycopg-binary for psycopg[binary])
    required = set().union(*(_requirements_of(r) for r in ranges.values() if _installed(r.name)))
    unranged = sorted(set(_pins(REPO / lock, own_only=True)) - set(ranges) - required)
    problems = [
        *(f"{lock} does not pin {name}" for name in missing),
        *(f"{lock} pins {pin}, outside pyproject's range" for pin in outside),
        *(f"{lock} pins {name}, which no range names or requires" for name in unranged),
    ]
    assert not problems, "\n".join(problems)


def test_every_group_of_pyproject_has_a_lock() -> None:
    groups = {group for groups in LOCKS.values() for group in groups}
    assert groups == {"dependencies", *PYPROJECT["project"]["optional-dependencies"]}


def test_dataflow_hub_files() -> None:
    tags = json.loads((REPO / "finetune_module" / "tags.json").read_text(encoding="utf-8"))
    assert tags["schema"] == "1.0"
    assert tags["use_case_tags"] and all(isinstance(t, str) for t in tags["use_case_tags"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags["secondary_tags"].items())
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["finetune_module"]
    assert sorted(package_data) == sorted(HUB_FILES)
    # each line of valid_configs.jsonl is checked and built by tests/test_model_kinds.py


def test_version_is_written_once() -> None:
    assert "version" in PYPROJECT["project"]["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "finetune_module.__version__"}


# --- the wheel, installed into a fresh virtual environment ---------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built once from a copy of the files the build reads (so nothing is
    written into the repository), with the setuptools installed here."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("finetune_module-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed by pip; its dependencies are this
    environment's (a .pth file adds this site-packages after its own), so nothing is
    downloaded."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    Path(site, "_project_dependencies.pth").write_text("\n".join(here) + "\n", encoding="utf-8")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    return root


def _run_in_venv(venv: Path, cwd: Path, program: str, *args: str) -> str:
    """The standard output of one of the venv's programs (`bin/<program>`) run in `cwd`, with
    nothing in the environment that points Python at the repository, offline for the hub; a
    failure fails the test with its standard error."""
    unset = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [venv / "bin" / program, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_wheel_holds_the_package_and_its_data_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"finetune_module", f"finetune_module-{finetune_module.__version__}.dist-info"}
    assert {f"finetune_module/{name}" for name in HUB_FILES} <= set(names)
    assert "finetune_module/engine/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "finetune = finetune_module.cli:main" in scripts


@pytest.mark.slow
def test_installed_package_runs_the_tiny_fine_tune_from_any_directory(
    venv: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    shutil.copy2(EXAMPLE_DATA, tmp_path / EXAMPLE_DATA.name)
    (tmp_path / "my_run.py").write_text(RUN_FILE, encoding="utf-8")
    inputs: dict[str, Any] = {
        "data_path": EXAMPLE_DATA.name,
        "input_text_key": "question",
        "output_text_key": "reply",
        "model_id": str(tiny_model_dir),
        **QUICK,
    }
    output = _run_in_venv(venv, tmp_path, "python", "my_run.py", json.dumps(inputs), *HUB_FILES)
    report = json.loads(output.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(venv)  # the installed copy, not the repository
    assert report["importable"] == {"bench": False, "tests": False}
    assert report["hub_files"] == sorted(HUB_FILES)
    saved = tmp_path / "finetuned-model" / "best_model"  # the default output_dir, in the cwd
    assert Path(report["saved"]).resolve() == saved.resolve()
    assert report["hold_out"] > 0
    for name in ("adapter_model.safetensors", "metrics.json", "hold_out_predictions.csv"):
        assert (saved / name).is_file(), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "flag", "starts"),
    [
        (("finetune",), "--version", f"finetune {finetune_module.__version__} (Python "),
        (("python", "-m", "finetune_module"), "--help", "usage: finetune"),
    ],
)
def test_installed_command_runs_from_any_directory(
    venv: Path, tmp_path: Path, command: tuple[str, ...], flag: str, starts: str
) -> None:
    output = _run_in_venv(venv, tmp_path, *command, flag)
    assert output.startswith(starts), output[:500]
