"""One writer per output directory: a run holds its directory for its whole length; a second
run into it is refused at once naming the holder; a lock a dead process left is taken over
with a warning; no run removes another live run's files; saved directories take the umask."""

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import run
from finetune_module.engine.files import LOCK_FILE, RunLock, RunLockedError, atomic_directory
from tests.conftest import EXAMPLE_DATA, QUICK, REPO, run_dag

# Another process taking the directory with the real RunLock. It imports only what the lock
# needs (the package's own __init__ would load torch and friends: seconds per process).
HOLDER = textwrap.dedent(
    f"""
    import sys, time, types
    package = types.ModuleType("finetune_module")
    package.__path__ = [{str(REPO / "finetune_module")!r}]
    sys.modules["finetune_module"] = package
    from finetune_module.engine.files import RunLock
    lock = RunLock(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding `tmp_path / "out"`, killed at the end."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "out")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def _cli_args(model_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--data", str(EXAMPLE_DATA), "--model-id", str(model_dir), "--output-dir",
        str(output_dir), "--max-steps", "1", "--max-new-tokens", "2", "--quiet",
    ]  # fmt: skip


def test_a_second_run_into_a_held_directory_is_refused_at_once_naming_the_holder(
    holder: subprocess.Popen[str],
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert run.main(_cli_args(tiny_model_dir, out)) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert f"Another run is writing to {out} (PID {holder.pid} on host " in error
    assert socket.gethostname() in error and "started 20" in error
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written or removed


def test_the_dataflow_itself_refuses_a_held_directory_before_training(
    holder: subprocess.Popen[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
        run_dag(
            "base", data_path=str(EXAMPLE_DATA), model_id=str(tiny_model_dir),
            output_dir=str(out), **QUICK,
        )  # fmt: skip
    assert not (out / "checkpoints").exists() and not (out / "best_model").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(
    holder: subprocess.Popen[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = RunLock(str(tmp_path / "out"))
    assert f"from a run that ended without releasing it (PID {holder.pid}" in caplog.text
    assert f'"pid": {os.getpid()}' in (tmp_path / "out" / LOCK_FILE).read_text()
    del lock


def test_a_lock_is_released_with_its_run_and_shared_within_a_process(tmp_path: Path) -> None:
    directory = str(tmp_path / "out")
    first = RunLock(directory)
    second = RunLock(directory)  # the same process may take it again (a second run)
    del first
    probe = [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), directory]
    taken = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert taken.returncode != 0 and "Another run is writing to" in taken.stderr
    del second  # the last one: released; the directory only the lock made goes with it
    assert not (tmp_path / "out").exists()
    taken = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and "Taking over" not in taken.stderr


def test_a_run_leaves_its_directory_free_for_the_next(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run.main(_cli_args(tiny_model_dir, out)) == 0
    assert (out / LOCK_FILE).read_text() == ""
    probe = [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(out)]
    taken = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0, taken.stderr


def test_staging_directories_of_live_processes_are_left_alone(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    parent = tmp_path / "exports"
    parent.mkdir()
    live = parent / f".model.tmp-{socket.gethostname()}-{holder.pid}-abcd1234"
    dead = parent / f".model.tmp-{socket.gethostname()}-{2**22 + 7}-abcd1234"  # no such PID
    old = parent / ".model.tmp-abcd1234"  # written before staging names carried their owner
    for directory in (live, dead, old):
        directory.mkdir()
        (directory / "weights").write_text("half written")
    with atomic_directory(str(parent / "model")) as staging:
        Path(staging, "weights").write_text("whole")
    assert live.exists() and not dead.exists() and not old.exists()
    assert (parent / "model" / "weights").read_text() == "whole"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_directories_take_the_umask(umask: int, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        with atomic_directory(str(tmp_path / "model")) as staging:
            Path(staging, "weights").write_text("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "model").stat().st_mode)
    assert mode == 0o777 & ~umask


def test_a_runs_saved_model_is_readable_by_others_under_a_022_umask(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    previous = os.umask(0o022)
    try:
        result = run_dag(
            "base", data_path=str(EXAMPLE_DATA), model_id=str(tiny_model_dir),
            output_dir=str(tmp_path / "out"), **QUICK,
        )  # fmt: skip
    finally:
        os.umask(previous)
    best = Path(result["save_best_models"])
    for path in (best, *best.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
