"""A sweep's search space: which settings vary between trials and over what values, read from
plain data (the `search_space:` mapping of a YAML config) and checked before anything runs.

Each entry names a setting (an input of the dataflow) and says how it varies:

```yaml
search_space:
  learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range (log scale)
  num_train_epochs: {low: 1, high: 3}                     # an int range (both ends ints)
  lora_dropout: {low: 0.0, high: 0.2, step: 0.05}         # a float range on a grid
  r: [4, 8, 16]                                           # a list: one of these values
  target_modules: [[q, v], [q, k, v, o]]                  # choices may be lists
```
A range may say `type: float` or `type: int` to settle its kind; `{choices: [...]}` is the same
as a list. `Dimension.suggest` draws a trial's value with Optuna's `trial.suggest_*`; a choice
that is a list is shown to Optuna as its items joined by commas ("q,v"), as Optuna's categorical
values are numbers, booleans, text or None.
"""

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

from finetune_module.errors import SettingsError

#: The keys a range may have.
RANGE_KEYS = ("low", "high", "log", "step", "type")
KINDS = ("float", "int", "categorical")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One setting that varies between trials: a float or int range (`low`..`high`, on a log
    scale or a grid of `step` when asked) or a list of `choices`."""

    name: str
    kind: str  # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def labels(self) -> tuple[Any, ...]:
        """The choices as Optuna stores them: a list choice as its items joined by commas."""
        return tuple(choice_label(choice) for choice in self.choices)

    def suggest(self, trial: Any) -> Any:
        """This dimension's value for an Optuna trial (a list choice as the list itself)."""
        if self.kind == "categorical":
            label = trial.suggest_categorical(self.name, list(self.labels))
            return self.choices[self.labels.index(label)]
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            low, high = int(self.low), int(self.high)  # type: ignore[arg-type]
            return trial.suggest_int(self.name, low, high, step=step, log=self.log)
        return trial.suggest_float(
            self.name, float(self.low), float(self.high), step=self.step, log=self.log
        )

    def value_of(self, stored: Any) -> Any:
        """The setting's value for a parameter as Optuna stored it (a label back to its list)."""
        if self.kind == "categorical" and stored in self.labels:
            return self.choices[self.labels.index(stored)]
        return stored

    def examples(self) -> tuple[Any, ...]:
        """Values this dimension can take, to check against the setting's type: both ends of a
        range, or every choice."""
        if self.kind == "categorical":
            return self.choices
        return (self.low, self.high)


def choice_label(choice: Any) -> Any:
    """A choice as Optuna stores it: a list as its items joined by commas, else itself."""
    if isinstance(choice, list | tuple):
        return ",".join(str(item) for item in choice)
    return choice


def _number(value: Any) -> float | int | None:
    """A range end as a number: ints and floats as they are, text such as "1e-4" (YAML reads
    it as text) as a float; None when it is no number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _range(name: str, spec: Mapping[str, Any]) -> tuple[Dimension | None, list[str]]:
    """A range entry as a Dimension, or the problems that stop it being one."""
    problems = []
    unknown = sorted(set(map(str, spec)) - set(RANGE_KEYS))
    if unknown:
        problems.append(
            f"{name}: unknown keys {', '.join(unknown)}; a range has {', '.join(RANGE_KEYS)}"
        )
    if "low" not in spec or "high" not in spec:
        return None, [*problems, f"{name}: a range needs both low and high"]
    low, high = _number(spec["low"]), _number(spec["high"])
    if low is None or high is None:
        return None, [*problems, f"{name}: low and high must be numbers"]
    whole = isinstance(low, int) and isinstance(high, int)
    kind = spec.get("type") or ("int" if whole else "float")
    if kind not in ("int", "float"):
        return None, [*problems, f"{name}: type must be int or float, got {kind!r}"]
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        problems.append(f"{name}: log must be true or false")
    if step is not None and (_number(step) is None or _number(step) <= 0):
        problems.append(f"{name}: step must be a positive number")
    if log and step is not None:
        problems.append(f"{name}: give either log or step, not both")
    if kind == "int" and not all(float(x).is_integer() for x in (low, high)):
        problems.append(f"{name}: an int range needs whole numbers")
    if not math.isfinite(low) or not math.isfinite(high) or low >= high:
        problems.append(f"{name}: low must be below high (got {low} and {high})")
    elif log and low <= 0:
        problems.append(f"{name}: a log range needs low above 0 (got {low})")
    if problems:
        return None, problems
    cast = int if kind == "int" else float
    step = None if step is None else cast(_number(step))
    return Dimension(name, kind, cast(low), cast(high), bool(log), step), []


def _choices(name: str, choices: Any) -> tuple[Dimension | None, list[str]]:
    """A list entry as a categorical Dimension, or the problems that stop it being one."""
    if not isinstance(choices, list | tuple) or not choices:
        return None, [f"{name}: choices must be a non-empty list"]
    labels = [choice_label(choice) for choice in choices]
    odd = [c for c in labels if c is not None and not isinstance(c, bool | int | float | str)]
    if odd:
        return None, [f"{name}: a choice must be a number, text, a list or null, got {odd[0]!r}"]
    if len(set(map(repr, labels))) < len(labels):
        return None, [f"{name}: the choices repeat a value"]
    frozen = tuple(list(c) if isinstance(c, list | tuple) else c for c in choices)
    return Dimension(name, "categorical", choices=frozen), []


def parse_search_space(
    spec: Any,
    known: Collection[str],
    *,
    fixed: Collection[str] = (),
    accepts: Callable[[str, Any], bool] | None = None,
) -> tuple[Dimension, ...]:
    """The dimensions of a search space given as plain data, every entry checked; a
    SettingsError with one line per problem otherwise.

    :param spec: a mapping of setting names to a range (`{low, high, log, step, type}`) or a
        list of choices (or `{choices: [...]}`).
    :param known: the names of the settings that may vary (the dataflow's inputs).
    :param fixed: names among `known` that must stay the same in every trial (each named as
        such when asked for).
    :param accepts: whether a value fits a setting's type (`accepts(name, value)`); every choice
        and both ends of a range are checked.
    """
    if not isinstance(spec, Mapping) or not spec:
        raise SettingsError(
            "search_space must be a mapping of setting names to a range {low, high} or a list "
            "of choices."
        )
    problems: list[str] = []
    dimensions = []
    for name, entry in spec.items():
        name = str(name)
        if name not in known:
            problems.append(
                f"search_space: unknown setting {name!r}; settings that may vary: "
                f"{', '.join(sorted(set(known) - set(fixed)))}"
            )
            continue
        if name in fixed:
            problems.append(
                f"search_space: {name} cannot vary between trials (every trial shares the data, "
                "its tokenization and the sweep's directory)"
            )
            continue
        if isinstance(entry, Mapping) and "choices" in entry:
            extra = sorted(set(map(str, entry)) - {"choices"})
            dimension, found = _choices(name, entry["choices"])
            if extra:
                found.append(f"{name}: a list of choices has no other keys ({', '.join(extra)})")
        elif isinstance(entry, Mapping):
            dimension, found = _range(name, entry)
        elif isinstance(entry, list | tuple):
            dimension, found = _choices(name, entry)
        else:
            dimension, found = (
                None,
                [
                    f"{name}: give a range {{low, high}} or a list of choices, not {entry!r} (a "
                    "setting that stays the same goes outside search_space)"
                ],
            )
        if dimension is not None and accepts is not None and not found:
            wrong = [value for value in dimension.examples() if not accepts(name, value)]
            if wrong:
                found.append(f"{name}: {wrong[0]!r} is not a value of this setting's type")
        problems += [p if p.startswith("search_space") else f"search_space: {p}" for p in found]
        if dimension is not None and not found:
            dimensions.append(dimension)
    if problems:
        raise SettingsError("\n".join(problems))
    return tuple(dimensions)
