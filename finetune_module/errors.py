"""The errors this package raises for problems a user can fix (bad data, bad settings), and the
masking that keeps credentials out of every message."""

import importlib
import importlib.util
import re
from types import ModuleType


class FinetuneInputError(ValueError):
    """A problem with the user's data or settings, explained in one message.

    The CLI prints these without a traceback and exits with status 2.
    """


class DataError(FinetuneInputError):
    """The data file cannot be used: it names the file, the record and the key."""


class SettingsError(FinetuneInputError):
    """A setting (an input of the DAG) is outside what it may be."""


class ModelNotAvailableError(FinetuneInputError):
    """The model (or tokenizer) cannot be loaded from the hub or from disk."""


class StorageError(OSError):
    """The machine refused to write a run's files (disk full, read-only file system,
    permission denied), explained in one message that names the path.

    The CLI prints these without a traceback and exits with status 3; whatever was being
    written is removed, and what was there before is left as it was.
    """


def require_package(package: str, setting: str) -> None:
    """Refuses `setting` when the optional `package` it needs is not installed (looked up, not
    imported: GPU-only packages stay out of CPU runs)."""
    if importlib.util.find_spec(package) is None:
        raise SettingsError(
            f"{setting} needs the {package} package, which is not installed here: "
            "pip install -r requirements-gpu.txt"
        )


# scheme://user:PASSWORD@host  and  ...?password=PASSWORD&...
_URL_PASSWORD = re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@\s]*@")
_QUERY_PASSWORD = re.compile(r"(?P<keep>\bpassword=)[^&\s'\"]*", re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """The text with the password of every URL in it replaced by `***`."""
    text = _URL_PASSWORD.sub(r"\g<keep>***@", text)
    return _QUERY_PASSWORD.sub(r"\g<keep>***", text)


EXTRAS_HINT = "install the optional packages with `pip install -r requirements-extras.txt`"


def import_optional(module: str, needed_for: str) -> ModuleType:
    """The optional package `module`, or a SettingsError saying what needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SettingsError(
            f"{needed_for} needs the optional package {module.split('.')[0]!r}: {EXTRAS_HINT}."
        ) from e
