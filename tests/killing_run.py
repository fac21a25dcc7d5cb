"""run.py, killed (SIGKILL: no cleanup of any kind) at a chosen point (a test helper).

    python tests/killing_run.py POINT N [run.py arguments ...]

POINT is where the process dies, at the N-th time it gets there:
- step: after a training step;
- checkpoint: in the middle of writing a checkpoint (weights, optimizer and scheduler written,
  RNG state and trainer_state.json not yet);
- save: in the middle of saving the best model (adapter, tokenizer, metrics and predictions in
  the staging folder; the settings file and the renames still to come);
- rename: between the two renames that replace an existing best model (the old one moved
  aside, the new one not yet in place).
Only this helper patches these functions; the product code has no test hooks.
"""

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _dying_at(function: Callable[..., Any], count: int, before: bool = False) -> Callable[..., Any]:
    """`function`, killing the process after (or `before`) its `count`-th call."""
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if before and calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        result = function(*args, **kwargs)
        if not before and calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return dying


def main() -> int:
    point, count_text, *argv = sys.argv[1:]
    count = int(count_text)
    if point == "step":
        from finetune_module.engine.trainer import FinetuneTrainer

        FinetuneTrainer.training_step = _dying_at(FinetuneTrainer.training_step, count)
    elif point == "checkpoint":
        from transformers import Trainer

        Trainer._save_rng_state = _dying_at(Trainer._save_rng_state, count, before=True)
    elif point == "save":
        from finetune_module import artifacts

        artifacts._write_run_files = _dying_at(artifacts._write_run_files, count)
    elif point == "rename":
        from finetune_module.engine import files

        real_rename = os.rename

        def rename(source: str, target: str) -> None:
            real_rename(source, target)
            if target.endswith(files.BACKUP_SUFFIX):  # the old model moved aside: die here
                os.kill(os.getpid(), signal.SIGKILL)

        files.os.rename = rename  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    import run

    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
