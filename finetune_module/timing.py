"""Timing: the wall time of each stage of a run, recorded by a Hamilton lifecycle adapter.

`StageTimer` times every node of a `dr.execute(...)` and adds the time to its stage (the
node's module: data, tokenization, model, training, evaluation, report, artifacts). While the
run executes, the report stage's `run_timings` node reads the times so far from it, so the
report and `run_info.json` show when the run started and each stage's time up to the report
(the report and artifacts stages run after it: `finetune` prints the whole run's times at the
end).

`finetune_module.build_driver` and the `finetune` command attach one; a run file built with
`driver.Builder()` adds it with `.with_adapters(finetune_module.timing_adapter())`. Without it
the run works the same and its report says the times were not recorded.
`StageTimer.readings` holds a finished run's times (every stage, the artifacts stage too).

```python
dr = (driver.Builder().with_config({"start": "base"}).with_modules(*finetune_module.MODULES)
      .with_adapters(finetune_module.timing_adapter()).build())
```
The times reach the report through a context variable that the adapter sets for the length of
each `execute` call, in the thread that calls it (Hamilton's default executor runs every node
there; under a parallel executor the report says the times were not recorded).
"""

import contextlib
import contextvars
from typing import Any

from hamilton import lifecycle

from finetune_module.engine.run_info import StageClock
from finetune_module.pictures import STAGE_NAMES

_RUNNING: contextvars.ContextVar[StageClock | None] = contextvars.ContextVar(
    "finetune_module_stage_clock", default=None
)


def _in_stage_order(readings: dict[str, Any]) -> dict[str, Any]:
    """A clock's readings with the stages in execution order (`STAGE_NAMES`, then any other
    module's nodes by name) and the seconds rounded to milliseconds."""
    seconds = readings["stage_seconds"]
    order = [name for name in (*STAGE_NAMES, *sorted(seconds)) if name in seconds]
    return {
        **readings,
        "stage_seconds": {name: round(seconds[name], 3) for name in dict.fromkeys(order)},
        "elapsed_seconds": round(readings["elapsed_seconds"], 3),
    }


def stage_of(node_tags: dict[str, Any]) -> str:
    """A node's stage: the short name of the module that defines it ("data", "training", ...)."""
    return str(node_tags.get("module", "")).rsplit(".", 1)[-1] or "other"


class StageTimer(lifecycle.GraphExecutionHook, lifecycle.NodeExecutionHook):
    """A Hamilton adapter that records each stage's wall time in every run it sees: the sum of
    the times of the stage's nodes (a node taken from Hamilton's cache counts the time taken to
    fetch it). `readings` holds the last run's, once it has finished."""

    def __init__(self) -> None:
        self.clock: StageClock | None = None
        self.readings: dict[str, Any] | None = None
        self._token: contextvars.Token[StageClock | None] | None = None

    def run_before_graph_execution(self, **kwargs: Any) -> None:
        """A run starts: a fresh clock, which this thread's nodes can read (`running_readings`)."""
        self.clock = StageClock()
        self.readings = None
        self._token = _RUNNING.set(self.clock)

    def run_before_node_execution(self, *, node_name: str, **kwargs: Any) -> None:
        """A node starts."""
        if self.clock is not None:
            self.clock.node_started(node_name)

    def run_after_node_execution(
        self, *, node_name: str, node_tags: dict[str, Any], **kwargs: Any
    ) -> None:
        """A node ends (or fails): its time goes to its stage."""
        if self.clock is not None:
            self.clock.node_finished(node_name, stage_of(node_tags))

    def run_after_graph_execution(self, **kwargs: Any) -> None:
        """The run ends: its readings are kept in `readings`, and its clock is put away."""
        if self.clock is not None:
            self.readings = _in_stage_order(self.clock.so_far())
        if self._token is not None:
            # ended in another context than it began: leave that context alone
            with contextlib.suppress(ValueError):
                _RUNNING.reset(self._token)
            self._token = None


def timing_adapter() -> StageTimer:
    """A new `StageTimer`: pass it to `driver.Builder().with_adapters(...)` to have each stage's
    wall time in the report and `run_info.json`."""
    return StageTimer()


def running_readings() -> dict[str, Any] | None:
    """The readings so far of the run executing in this thread under a `StageTimer` (see
    `StageClock.so_far`; stages in execution order), or None when it has no timer."""
    clock = _RUNNING.get()
    return None if clock is None else _in_stage_order(clock.so_far())
