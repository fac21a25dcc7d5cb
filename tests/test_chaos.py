"""Chaos: a seeded loop kills a real run (SIGKILL) at several points in training, while
checkpointing and while saving, resuming after each kill. After every kill the previous best
model is complete and loadable, byte for byte as it was; at the end the resumed run saves the
same adapter as a run that was never interrupted."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_module
from finetune_module.engine.files import existing_directory
from tests.conftest import EXAMPLE_DATA, REPO, run_dag

SEED = 2026  # the loop's own seed: which points, which calls
SETTINGS = {"num_train_epochs": 3, "learning_rate": 5e-3, "max_new_tokens": 4}


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _killed_run(point: str, count: int, data: Path, model_dir: Path, out: Path) -> int:
    """run.py (resuming from the last complete checkpoint), killed at `point`; its status."""
    args = [
        sys.executable, str(REPO / "tests" / "killing_run.py"), point, str(count),
        "--data", str(data), "--model-id", str(model_dir), "--output-dir", str(out),
        "--resume_from_checkpoint", "--quiet",
        *(f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == -signal.SIGKILL, f"{point} {count}: {done.stderr[-2000:]}"
    return done.returncode


def _adapter(best_model: Path) -> dict[str, torch.Tensor]:
    return load_file(best_model / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_run_killed_again_and_again_ends_as_an_uninterrupted_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(EXAMPLE_DATA.read_text())[:60]), encoding="utf-8")
    common = {"data_path": str(data), "model_id": str(tiny_model_dir), **SETTINGS, "quiet": True}
    reference = run_dag("base", output_dir=str(tmp_path / "reference"), **common)
    steps = reference["training_and_validation_set_metrics"]["global_step"]
    reference_best = Path(reference["save_best_models"])

    # the run's directory starts with an earlier complete best model, which must survive
    out = tmp_path / "chaos"
    earlier = run_dag("base", output_dir=str(out), **{**common, "num_train_epochs": 1})
    best = Path(earlier["save_best_models"])
    for checkpoint in (out / "checkpoints").iterdir():  # that run's checkpoints do not fit
        for path in sorted(checkpoint.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        checkpoint.rmdir()
    before = _digests(best)

    rng = random.Random(SEED)
    kills = [
        ("step", rng.randint(1, steps // 3)),
        ("checkpoint", rng.randint(1, 2)),
        ("step", rng.randint(1, steps // 2)),
    ]
    for point, count in kills:
        status = _killed_run(point, count, data, tiny_model_dir, out)
        assert status == -signal.SIGKILL, f"{point} {count}: the run ended ({status})"
        kept = Path(existing_directory(str(best)))
        assert _digests(kept) == before, f"after a kill at {point} {count}"
        assert finetune_module.predict(str(kept), ["Can it run offline?"])  # loadable

    # training is done now or soon: kill the saves of the new best model, then let it finish
    for point, count in (("save", 1), ("rename", 1)):
        status = _killed_run(point, count, data, tiny_model_dir, out)
        assert status == -signal.SIGKILL, f"{point}: the run ended ({status})"
        kept = Path(existing_directory(str(best)))
        assert _digests(kept) == before, f"after a kill at {point}"
        assert finetune_module.predict(str(kept), ["Can it run offline?"])

    final = run_dag("base", output_dir=str(out), **common, resume_from_checkpoint=True)
    assert final["training_and_validation_set_metrics"]["global_step"] == steps
    adapter, expected = _adapter(Path(final["save_best_models"])), _adapter(reference_best)
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=1e-6, atol=0, msg=name)
    assert final["hold_out_set_predictions"] == reference["hold_out_set_predictions"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "best_model",
        "checkpoints",
    ]
