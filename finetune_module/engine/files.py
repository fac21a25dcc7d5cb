"""Writing a run's files: whole directories at once, so that an interrupted write leaves the
previous complete directory (or none), never half of one."""

import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The files a run writes beside its model (or in its evaluation directory)
METRICS_FILE = "metrics.json"
HOLD_OUT_PREDICTIONS_FILE = "hold_out_predictions.csv"
VALIDATION_PREDICTIONS_FILE = "validation_predictions.csv"
BASE_MODEL_PREDICTIONS_FILE = "base_model_predictions.csv"
SETTINGS_FILE = "finetune_settings.json"  # length caps, generation settings, prompt template
REPORT_FILE = "report.html"

# A directory being replaced is first renamed to `<dir>.old`; a crash between the two renames
# leaves it there, and the next write (or a reader, see `existing_directory`) takes it back.
BACKUP_SUFFIX = ".old"

logger = logging.getLogger(__name__)


@contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a fresh temporary directory that replaces `path` once the block succeeds.

    The old directory is moved aside, the new one renamed in, and the old one deleted; a
    crash between the two renames leaves the old one as `<path>.old`, restored on the next write.
    Staging directories left by a killed run (`.<name>.tmp-*`) are removed on the next write.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    backup = path + BACKUP_SUFFIX
    if os.path.isdir(backup) and not os.path.exists(path):
        os.rename(backup, path)
    prefix = f".{name}.tmp-"
    for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
        shutil.rmtree(stale, ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield staging
        if os.path.exists(path):
            shutil.rmtree(backup, ignore_errors=True)
            os.rename(path, backup)
        os.rename(staging, path)
        shutil.rmtree(backup, ignore_errors=True)
        logger.info("Wrote %s", path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON in `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")


def existing_directory(path: str) -> str:
    """`path`, or its `<path>.old` backup when a replacement was killed between its two
    renames (the previous complete directory is there)."""
    backup = path + BACKUP_SUFFIX
    if not os.path.exists(path) and os.path.isdir(backup):
        return backup
    return path
