"""The errors this package raises for problems a user can fix (bad data, bad settings)."""


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
