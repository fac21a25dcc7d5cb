"""Quiet libraries: a quiet run shows none of the progress bars, log lines and warnings that
transformers, peft, huggingface_hub and torch print by themselves, and only while it runs.

```python
with quiet_libraries(quiet):
    model = build_model(recipe, device)
```
"""

import contextlib
import warnings
from collections.abc import Iterator

from huggingface_hub import utils as hub_utils
from huggingface_hub.utils import logging as hub_logging
from transformers.utils import logging as transformers_logging

#: The libraries whose Python warnings a quiet run hides (by the module a warning comes from).
LIBRARIES = (
    *("transformers", "peft", "huggingface_hub", "accelerate", "torch"),
    *("tokenizers", "datasets", "safetensors", "bitsandbytes"),
)


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """Within it, when `quiet`: no progress bars of transformers and huggingface_hub (loading
    weights, writing model shards, downloads), none of their log lines below errors, and no
    Python warnings from the modules of `LIBRARIES`. Afterwards, each setting is as it was.

    :param quiet: False: nothing changes (so callers can pass their own setting).
    """
    if not quiet:
        yield
        return
    verbosity = transformers_logging.get_verbosity()
    hub_verbosity = hub_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    with warnings.catch_warnings():  # restores the warning filters on the way out
        warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
        transformers_logging.set_verbosity_error()
        hub_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # huggingface_hub's bars too
        try:
            yield
        finally:
            transformers_logging.set_verbosity(verbosity)
            hub_logging.set_verbosity(hub_verbosity)
            if bars:
                transformers_logging.enable_progress_bar()  # huggingface_hub's bars too
            if hub_bars_off and not hub_utils.are_progress_bars_disabled():
                hub_utils.disable_progress_bars()
            elif not hub_bars_off and hub_utils.are_progress_bars_disabled():
                hub_utils.enable_progress_bars()
