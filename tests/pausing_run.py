"""run.py, paused at a chosen moment so that a test can kill it there (a test helper).

    python tests/pausing_run.py checkpoint|save MARKER [run.py arguments ...]

checkpoint: pauses in the middle of training, right after the Trainer wrote its first checkpoint.
save: pauses in the middle of saving the best model, when the adapter, tokenizer, metrics and
    predictions are in the staging folder and the settings file and the rename are still to come.
MARKER is created when the pause begins. Only the test process patches these functions; the
product code has no test hooks.
"""

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pausing_after(function: Callable[..., Any], marker: str) -> Callable[..., Any]:
    """`function`, followed by creating `marker` and waiting to be killed."""

    def paused(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        Path(marker).touch()
        time.sleep(600)
        return result

    return paused


def main() -> int:
    # Ctrl-C as in a terminal, whatever the test runner was started from: a runner started in
    # the background of a non-interactive shell (`cmd &`) hands its children SIGINT ignored, and
    # a run that ignores it would sleep through the test's signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pause_at, marker, *argv = sys.argv[1:]
    if pause_at == "checkpoint":
        from transformers import Trainer

        Trainer._save_checkpoint = _pausing_after(Trainer._save_checkpoint, marker)
    elif pause_at == "save":
        from finetune_module import artifacts

        artifacts._write_run_files = _pausing_after(artifacts._write_run_files, marker)
    else:
        raise SystemExit(f"unknown pause point {pause_at!r}")
    import run

    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
