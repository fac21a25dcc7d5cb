"""The machine refusing to store a run's files: a full disk while a checkpoint or the final
model is written, a read-only file system, a directory this user may not write to. Each is one
line naming the path, exit status 3, and nothing half-written left behind.

Real conditions, not simulated ones: small tmpfs mounts (root only: skipped elsewhere, saying
why) and an unprivileged user for permissions."""

import errno
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from finetune_module.engine.files import atomic_directory, storage_error
from finetune_module.errors import StorageError
from finetune_module.tiny_model import build_t5, texts_of
from tests.conftest import EXAMPLE_DATA, REPO, TINY

ROOT = os.geteuid() == 0


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mounts a tmpfs of a given size (read-only if asked) under tmp_path; unmounted after."""
    mounted: list[Path] = []

    def tmpfs(size: str, read_only: bool = False) -> Path:
        if not ROOT:
            pytest.skip("mounting a small file system needs root")
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield tmpfs
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _cli(
    model_dir: Path, output_dir: Path, *extra: str, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """run.py on the example data, in a process of its own (as `user` if given)."""
    args = [
        sys.executable, "run.py", "--data", str(EXAMPLE_DATA), "--model-id", str(model_dir),
        "--output-dir", str(output_dir), "--max-steps", "2", "--max-new-tokens", "2", "--quiet",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    preexec = None
    if user is not None:
        entry = pwd.getpwnam(user)
        env["HOME"] = env["HF_HOME"] = str(output_dir.parent.parent / "home")

        def preexec() -> None:
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, preexec_fn=preexec
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_disk_full_at_the_first_checkpoint_stops_with_exit_3_naming_it(
    mount: Callable[..., Path], tiny_model_dir: Path
) -> None:
    disk = mount("96k")  # the lock file fits; a checkpoint (optimizer state and all) does not
    out = _cli(tiny_model_dir, disk / "out")
    assert out.returncode == 3, out.stderr
    line = _one_line(out.stderr)
    checkpoint = disk / "out" / "checkpoints" / "checkpoint-2"
    assert line.startswith(f"error: Cannot write the checkpoint {checkpoint}: no space left on")
    assert "free some space, or choose another output_dir" in line
    assert not checkpoint.exists()  # no half-written checkpoint to resume from
    assert not (disk / "out" / "best_model").exists()


def test_a_disk_full_at_the_final_save_leaves_no_half_model(
    mount: Callable[..., Path], tiny_model_dir: Path
) -> None:
    disk = mount("2m")  # checkpoints fit; the best model's report (plotly inside) does not
    out = _cli(tiny_model_dir, disk / "out")
    assert out.returncode == 3, out.stderr
    line = _one_line(out.stderr)
    assert line.startswith(f"error: Cannot write the directory {disk / 'out' / 'best_model'}: ")
    assert "no space left on device" in line
    assert sorted(p.name for p in (disk / "out").iterdir()) == [".finetune.lock", "checkpoints"]


def test_a_read_only_file_system_stops_at_once_with_exit_3(
    mount: Callable[..., Path], tiny_model_dir: Path
) -> None:
    disk = mount("1m", read_only=True)
    out = _cli(tiny_model_dir, disk / "out")
    assert out.returncode == 3, out.stderr
    assert _one_line(out.stderr) == (
        f"error: Cannot write the output directory {disk / 'out'}: read-only file system; "
        "write the run somewhere writable (output_dir). Nothing half-written was left there."
    )


@pytest.mark.skipif(not ROOT, reason="switching to an unprivileged user needs root")
def test_a_directory_this_user_may_not_write_stops_with_exit_3() -> None:
    for needed in (REPO, Path(sys.executable).resolve(), EXAMPLE_DATA):
        for path in (needed, *needed.parents):
            if path.is_dir() and path.stat().st_mode & 0o005 != 0o005:
                pytest.skip(f"{path} is not readable by other users")
    base = Path(tempfile.mkdtemp(prefix="finetune-permissions-"))  # pytest's own is 0700
    try:
        base.chmod(0o755)
        model_dir = Path(build_t5(str(base / "model"), texts_of(str(EXAMPLE_DATA)), **TINY))
        for path in (model_dir, *model_dir.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (base / "home").mkdir(mode=0o777)
        locked = base / "locked"
        locked.mkdir(mode=0o755)  # root's: the user nobody may not write in it
        out = _cli(model_dir, locked / "out", user="nobody")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert out.returncode == 3, out.stderr
    assert _one_line(out.stderr) == (
        f"error: Cannot write the output directory {locked / 'out'}: permission denied; give "
        "this user write access, or choose another output_dir. Nothing half-written was left "
        "there."
    )


@pytest.mark.skipif(not ROOT, reason="chattr needs root")
def test_a_directory_no_one_may_write_stops_with_exit_3(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An immutable directory (chattr +i) refuses even root: "operation not permitted"."""
    locked = tmp_path / "locked"
    locked.mkdir()
    done = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a directory immutable here: {done.stderr.strip()}")
    try:
        out = _cli(tiny_model_dir, locked / "out")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert out.returncode == 3, out.stderr
    assert _one_line(out.stderr) == (
        f"error: Cannot write the output directory {locked / 'out'}: operation not permitted; "
        "give this user write access, or choose another output_dir. Nothing half-written was "
        "left there."
    )


def test_a_refused_write_of_a_saved_directory_leaves_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "best_model"
    target.mkdir()
    (target / "weights").write_text("old")
    refused = pytest.raises(StorageError, match=f"Cannot write the directory {target}: ")
    with refused, atomic_directory(str(target)) as staging:
        Path(staging, "weights").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["best_model"]


def test_library_errors_without_an_errno_are_recognised() -> None:
    torch_style = RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
        "data/0: file write failed"
    )
    refused = storage_error(torch_style, "the checkpoint", "/tmp/x/checkpoint-1")
    assert refused is not None and "Cannot write the checkpoint /tmp/x/checkpoint-1: " in str(
        refused
    )
    assert storage_error(RuntimeError("shape mismatch"), "the checkpoint", "/tmp/x") is None
    quota = storage_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "the directory", "/tmp")
    assert quota is not None and "disk quota exceeded" in str(quota)
