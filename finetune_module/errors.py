"""The errors this package raises for problems a user can fix (bad data, bad settings)."""

import importlib.util


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


def require_package(package: str, setting: str) -> None:
    """Refuses `setting` when the optional `package` it needs is not installed (looked up, not
    imported: GPU-only packages stay out of CPU runs)."""
    if importlib.util.find_spec(package) is None:
        raise SettingsError(
            f"{setting} needs the {package} package, which is not installed here: "
            "pip install -r requirements-gpu.txt"
        )
