"""The `finetune` command: the dataflow from the shell (also `python -m finetune_module`, and
`python run.py` in a checkout).

    finetune --data example-support-dataset.json                  # train: the default command
    finetune train --config run.yaml --num_train_epochs 3        # flags override the file
    finetune evaluate finetuned-model --data example-support-dataset.json
    finetune predict --model-dir finetuned-model "How do I reset my password?"
    finetune export --model-dir finetuned-model --to merged-model
    finetune dag dag.png --stage training                        # draw the dataflow
    finetune sweep --config sweep.yaml --n-trials 6              # try settings with Optuna

The flags of `train`, `evaluate` and `sweep` are generated from the dataflow: every external
input of the driver (over each of its configs) is a flag named after the input
(`--num_train_epochs`, also spelt `--num-train-epochs`), with the input's type, its default and
the text of its `:param:` line. A YAML file given with `--config` uses the same names (a
sweep's file also holds its `search_space:`). Only a few short names are added by hand
(`ALIASES`). The flags of `predict` and `export` are generated the same way
from `finetune_module.predict` and `finetune_module.export_merged`.

Exit status: 0 on success, 2 on bad data or settings, 3 when the disk or its permissions refuse
to store the run's files, 1 on any other failure, 130 when interrupted (Ctrl-C).
"""

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import platform
import re
import sys
import textwrap
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import yaml
from hamilton import driver, htypes

import finetune_module
from finetune_module.engine import distributed
from finetune_module.engine.files import REPORT_FILE, RunLock, release_directory
from finetune_module.engine.quiet import quiet_libraries
from finetune_module.errors import SettingsError

PROG = "finetune"

#: The subcommands and what each does; `train` runs when none is named.
COMMANDS = {
    "train": "fine-tune the model on the data, evaluate it and save the best model (default)",
    "evaluate": "evaluate a saved fine-tune on the data (the dataflow's start: presaved)",
    "predict": "answer questions with a saved fine-tune",
    "export": "merge a saved LoRA adapter into its base model (loads without peft)",
    "dag": "draw the dataflow as a picture",
    "sweep": "fine-tune with many settings drawn by Optuna from a search space; keep the best",
}

#: Short names of inputs, kept from the first command line (the generated names work too).
ALIASES = {
    "data_path": ("--data",),
    "input_text_key": ("--input-key",),
    "output_text_key": ("--output-key",),
    "r": ("--lora-r",),
    "resume_from_checkpoint": ("--resume",),
    "extra_training_args": ("--training-arg",),
    "export_dir": ("--to",),
}

#: Where `predict` and `export` look for a saved fine-tune when not told: the default run
#: directory (its best model is used).
DEFAULT_RUN_DIR = finetune_module.settings.DEFAULT_OUTPUT_DIR

#: The command line's defaults for inputs that have none: the reference module's keys, and
#: the default run directory.
CLI_DEFAULTS = {
    "input_text_key": "question",
    "output_text_key": "reply",
    "model_dir": DEFAULT_RUN_DIR,
}

#: Words read as None for an input whose default None means "decided for you".
_AUTO_WORDS = {"cpu_speedups": ("auto",)}
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
_NONE_WORDS = ("none", "null")
REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Flag:
    """One input as a flag: its name, type, default (`REQUIRED` when it has none), the text of
    its `:param:` line, and the help group it is listed in."""

    name: str
    type: Any
    default: Any
    help: str
    group: str


# --- reading the dataflow's inputs ------------------------------------------------------------


def param_docs(function: Callable[..., Any]) -> dict[str, str]:
    """The `:param name: text` lines of a function's docstring, each text on one line."""
    docs: dict[str, str] = {}
    for match in re.finditer(
        r":param (\w+):(.*?)(?=\n\s*:\w|\n\s*\n|\Z)", inspect.getdoc(function) or "", re.S
    ):
        docs[match.group(1)] = " ".join(match.group(2).split())
    return docs


def _comment_groups(function: Callable[..., Any]) -> dict[str, str]:
    """Each parameter's group, from the `# comment` line above it in the function's signature
    (the settings node groups its inputs so); {} when the signature has no such comments."""
    lines = textwrap.dedent(inspect.getsource(function)).splitlines()
    definition = ast.parse("\n".join(lines)).body[0]
    assert isinstance(definition, ast.FunctionDef)
    arguments = [*definition.args.args, *definition.args.kwonlyargs]
    groups: dict[str, str] = {}
    group, seen = None, definition.lineno - 1
    for argument in sorted(arguments, key=lambda a: a.lineno):
        for line in lines[seen : argument.lineno - 1]:
            comment = re.match(r"\s*#\s*(.+)", line)
            group = comment.group(1).strip() if comment else group
        seen = argument.lineno - 1
        if group:
            groups[argument.arg] = group
    return groups


def _stage(function: Callable[..., Any]) -> str:
    """The stage a node belongs to: its module's short name."""
    return function.__module__.rsplit(".", 1)[-1]


def _position(function: Callable[..., Any]) -> tuple[int, int]:
    """Where a node is defined: its stage's place in `MODULES`, then its line."""
    module = sys.modules[function.__module__]
    return finetune_module.MODULES.index(module), function.__code__.co_firstlineno


@functools.cache
def dataflow_inputs() -> tuple[Flag, ...]:
    """Every external input of the dataflow, over each of its configs (each start and source),
    in the order the nodes declare them: type, default, `:param:` text and group (the settings
    node's comment groups; the stage's name for other nodes). Config keys are not inputs.

    The text is the longest `:param:` line among the nodes that take the input; where the
    sources describe it differently (data_path), each source's text is given."""
    found: dict[str, tuple[Any, Callable[..., Any]]] = {}
    texts: dict[str, dict[str, str]] = {}
    for start in finetune_module.STARTS:
        for source in finetune_module.SOURCES:
            dr = finetune_module.build_driver(start, source=source)
            for variable in dr.list_available_variables():
                if not (variable.is_external_input and variable.originating_functions):
                    continue
                name = variable.name
                first = min(variable.originating_functions, key=_position)
                if name not in found or _position(first) < _position(found[name][1]):
                    found[name] = (variable.type, first)
                for user in dr.graph.nodes[name].depended_on_by:
                    for function in user.originating_functions or ():
                        text = param_docs(function).get(name, "")
                        kept = texts.setdefault(name, {}).get(source, "")
                        texts[name][source] = max(kept, text, key=len)
    flags = []
    for name, (annotation, first) in found.items():
        by_source = {source: text for source, text in texts.get(name, {}).items() if text}
        if len(set(by_source.values())) > 1:
            text = " ".join(f"({source}) {text}" for source, text in by_source.items())
        else:
            text = next(iter(by_source.values()), "")
        default = inspect.signature(first).parameters[name].default
        group = _comment_groups(first).get(name, _stage(first))
        order = (_position(first), list(inspect.signature(first).parameters).index(name))
        flags.append((order, Flag(name, annotation, default, text, group)))
    return tuple(flag for _, flag in sorted(flags, key=lambda pair: pair[0]))


def function_inputs(function: Callable[..., Any], group: str, skip: Sequence[str]) -> list[Flag]:
    """A function's keyword parameters as flags (`predict`, `export_merged`), but those in
    `skip`: type, default and `:param:` text."""
    docs = param_docs(function)
    hints = typing.get_type_hints(function)
    return [
        Flag(name, hints[name], parameter.default, docs.get(name, ""), group)
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in skip
    ]


# --- turning inputs into flags ----------------------------------------------------------------


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types a union allows (the type itself when it is not a union), generics reduced to
    their origin (list[str] -> list)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(typing.get_origin(m) or m for m in typing.get_args(annotation))
    return (typing.get_origin(annotation) or annotation,)


def value_reader(name: str, annotation: Any) -> Callable[[str], Any]:
    """Reads one word typed on the command line as a value of the input's type: none/null as
    None, true/false (yes/no, on/off) as a boolean, numbers as numbers, `{...}` as a mapping,
    where the type allows each, else the text itself."""
    members = _members(annotation)

    def read(text: str) -> Any:
        word = text.strip().lower()
        if word in _AUTO_WORDS.get(name, ()):
            return None
        if type(None) in members and word in _NONE_WORDS:
            return None
        if bool in members and word in _TRUE_WORDS + _FALSE_WORDS:
            return word in _TRUE_WORDS
        if int in members:
            with contextlib.suppress(ValueError):
                return int(text)
        if float in members:
            with contextlib.suppress(ValueError):
                return float(text)
        if dict in members and text.lstrip().startswith("{"):
            with contextlib.suppress(yaml.YAMLError):
                return yaml.safe_load(text)
        if str in members or list in members:
            return text
        raise argparse.ArgumentTypeError(f"expected {_type_name(annotation)}, got {text!r}")

    return read


def _type_name(annotation: Any) -> str:
    """A type as the user reads it: `float | int | None`."""
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "").replace("NoneType", "None")


class _KeyValues(argparse.Action):
    """`KEY=VALUE`, repeatable, gathered into one mapping; VALUE is read as YAML (numbers,
    booleans and lists keep their type)."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        key, sep, text = str(value).partition("=")
        if not sep or not key:
            parser.error(f"{option}: expected KEY=VALUE, got {value!r}")
        gathered = getattr(namespace, self.dest, None)
        gathered = dict(gathered) if isinstance(gathered, dict) else {}
        gathered[key] = yaml.safe_load(text)
        setattr(namespace, self.dest, gathered)


class _Words(argparse.Action):
    """Words of a list input (`--target_modules q v`, also `q,v`), each read as a value; one
    word that is not a name (none, true, ...) stands for that value instead."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        words = [w.strip() for value in values for w in str(value).split(",") if w.strip()]
        read = value_reader(self.dest, self.type_hint)
        single = read(words[0]) if len(words) == 1 else words[0]
        setattr(namespace, self.dest, single if not isinstance(single, str) else words)


def _metavar(flag: Flag) -> str | None:
    """The flag's value placeholder in the help."""
    members = _members(flag.type)
    if dict in members and str not in members:
        return "KEY=VALUE"
    if list in members:
        return "NAME"
    if int in members and float not in members:
        return "N"
    if float in members:
        return "NUMBER" if str not in members else "VALUE"
    return "PATH" if re.search(r"(_path|_dir|deepspeed|_config)$", flag.name) else "TEXT"


def _help(flag: Flag) -> str:
    """The flag's help: its `:param:` text and its default."""
    if re.search(
        r"\bdefault\b", flag.help, re.IGNORECASE
    ):  # the text says it, often better than the value
        return flag.help.replace("%", "%%")
    if flag.name in CLI_DEFAULTS:
        default = f"default: {CLI_DEFAULTS[flag.name]}"
    elif flag.default is REQUIRED:
        default = "required"
    else:
        default = f"default: {_shown(flag.default)}"
    return f"{flag.help} ({default})".replace("%", "%%")


def _shown(value: Any) -> str:
    """A default as typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def add_flag(parser: argparse._ActionsContainer, flag: Flag) -> None:
    """Adds the flag for one input: `--name` (with the input's own name) and the short names
    of `ALIASES`, shown in the help, and `--name-with-dashes`, accepted but not shown."""
    members = _members(flag.type)
    default = CLI_DEFAULTS.get(flag.name, None if flag.default is REQUIRED else flag.default)
    shown = [*ALIASES.get(flag.name, ()), f"--{flag.name}"]
    hidden = [f"--{flag.name.replace('_', '-')}"]
    hidden = [option for option in hidden if option not in shown]
    kwargs: dict[str, Any] = {"dest": flag.name, "default": default}
    if members == (bool,):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif dict in members and str not in members:
        kwargs.update(action=_KeyValues, metavar=_metavar(flag))
    elif list in members:
        kwargs.update(action=_Words, nargs="+", metavar=_metavar(flag))
    elif bool in members and str in members:  # resume_from_checkpoint: alone, True
        kwargs.update(nargs="?", const=True, type=value_reader(flag.name, flag.type))
        kwargs["metavar"] = _metavar(flag)
    else:
        reader = value_reader(flag.name, flag.type)
        if flag.name == "prompt_template":  # a template's new lines typed as \n
            reader = _with_escapes
        kwargs.update(type=reader, metavar=_metavar(flag))
    action = parser.add_argument(*shown, help=_help(flag), **kwargs)
    action.type_hint = flag.type  # type: ignore[attr-defined]
    if hidden:
        extra = parser.add_argument(*hidden, help=argparse.SUPPRESS, **kwargs)
        extra.type_hint = flag.type  # type: ignore[attr-defined]


def _with_escapes(text: str) -> str:
    """The text with `\\n` and `\\t` typed on the command line read as a new line and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


# --- the parsers --------------------------------------------------------------------------------


def version_text() -> str:
    """What `--version` prints: this package's version and those of the libraries it runs on."""
    from importlib import metadata

    libraries = []
    for name in ("torch", "transformers", "peft", "apache-hamilton"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            libraries.append(f"{name} {metadata.version(name)}")
    return (
        f"{PROG} {finetune_module.__version__} (Python {platform.python_version()}; "
        f"{', '.join(libraries)})"
    )


def _new_parser(command: str, description: str, epilog: str | None = None) -> Any:
    """An empty parser for one command, with `--version` and `--debug`."""
    parser = argparse.ArgumentParser(
        prog=PROG if command == "train" else f"{PROG} {command}",
        description=textwrap.fill(description, 92),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def _config_flags(parser: Any, start: bool) -> None:
    """The driver config's flags that are not inputs: the source, and (with `start`) the start."""
    if start:
        parser.add_argument(
            "--start",
            choices=finetune_module.STARTS,
            help="base: fine-tune (default); presaved: evaluate a saved fine-tune, as "
            f"`{PROG} evaluate` does",
        )
    parser.add_argument(
        "--source",
        choices=finetune_module.SOURCES,
        help="where the records come from: file (default: data_path read by its extension) or "
        "sql (data_path is a database URL)",
    )


def _dataflow_parser(command: str) -> Any:
    """`finetune train`, `finetune evaluate` and `finetune sweep`: a flag for every input of
    the dataflow (and the sweep's own flags)."""
    commands = "\n".join(f"  {name:9s} {text}" for name, text in COMMANDS.items())
    parser = _new_parser(
        command,
        __doc__.split("\n\n")[0] if command == "train" else COMMANDS[command].capitalize() + ".",
        f"commands:\n{commands}\n\n{PROG} COMMAND --help shows a command's flags.\n\n"
        + __doc__.split("\n\n", 1)[1],
    )
    parser.usage = {
        "train": f"{PROG} [{'|'.join(COMMANDS)}] [flags]",
        "evaluate": f"{PROG} evaluate [MODEL] --data PATH [flags]",
        "sweep": f"{PROG} sweep --config PATH [--n-trials N] [--storage URL] [flags]",
    }[command]
    parser.add_argument("--config", metavar="PATH", help="a YAML file of inputs (flags win)")
    if command == "evaluate":
        parser.add_argument(
            "presaved_model_path",
            nargs="?",
            metavar="MODEL",
            help="the saved fine-tune: a run's output directory (its best model), a best_model/ "
            "or checkpoint-N/ folder (default: output_dir's best model)",
        )
    _config_flags(parser, start=command == "train")
    flags = dataflow_inputs()
    first = [flag.group for flag in flags if flag.default is REQUIRED]
    groups: dict[str, Any] = {}
    for title in dict.fromkeys([*first, *(flag.group for flag in flags)]):
        groups[title] = parser.add_argument_group(title)
    for flag in flags:
        add_flag(groups[flag.group], flag)
    groups[_group_of("use_lora")].add_argument(
        "--full-finetune",
        "--no-lora",
        dest="use_lora",
        action="store_const",
        const=False,
        help="the same as --no-use_lora: train every weight and save a full model",
    )
    _run_flags(parser.add_argument_group("caching, tracking and the picture"), command)
    if command == "sweep":
        _sweep_flags(parser.add_argument_group("the sweep (also keys of --config)"))
    return parser


def _yaml_mapping(text: str) -> Any:
    """A mapping typed on the command line as YAML (or JSON)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a mapping {{name: range or list}}, got {text!r}"
        )
    return value


def _sweep_flags(group: Any) -> None:
    """The flags of `finetune sweep` that are not inputs of the dataflow (`SWEEP_OPTIONS`)."""
    from finetune_module.engine import study
    from finetune_module.sweep import DEFAULT_STUDY_NAME

    group.add_argument(
        "--search-space",
        "--search_space",
        dest="search_space",
        type=_yaml_mapping,
        metavar="YAML",
        help="the settings that vary and over what, e.g. '{learning_rate: {low: 1.0e-4, high: "
        "1.0e-2, log: true}, r: [4, 8, 16]}' (default: search_space in --config)",
    )
    group.add_argument(
        "--n-trials",
        "--n_trials",
        dest="n_trials",
        type=int,
        metavar="N",
        help="trials this worker runs (default: 10)",
    )
    group.add_argument(
        "--storage",
        metavar="URL",
        help="where the study lives: sqlite:///FILE or postgresql://USER:PASSWORD@HOST/DB, "
        "shared by every worker given the same --study-name (default: sweep.db in output_dir)",
    )
    group.add_argument(
        "--study-name",
        "--study_name",
        dest="study_name",
        metavar="NAME",
        help=f"the study's name in the store (default: {DEFAULT_STUDY_NAME})",
    )
    group.add_argument(
        "--objective",
        choices=list(study.OBJECTIVES),
        help="what the sweep optimizes: eval_loss, the best checkpoint's validation loss, "
        "minimized (default), or a validation score, maximized",
    )
    group.add_argument(
        "--sampler", choices=study.SAMPLERS, help="how trials are drawn (default: tpe)"
    )
    group.add_argument(
        "--pruner",
        choices=study.PRUNERS,
        help="median (default): stop a trial whose validation loss after an epoch is worse than "
        "the median of earlier trials'; none: run every trial to the end",
    )


def _group_of(name: str) -> str:
    """The help group of an input."""
    return next(flag.group for flag in dataflow_inputs() if flag.name == name)


def _run_flags(group: Any, command: str) -> None:
    """The flags of a dataflow run that are not inputs: the cache, MLflow, the Hamilton UI, the
    picture."""
    group.add_argument(
        "--cache",
        nargs="?",
        const=".hamilton_cache",
        metavar="DIR",
        help="Hamilton's cache in DIR (default .hamilton_cache): a re-run with the same data, "
        "model and training settings re-uses the tokenized data and the trained weights",
    )
    group.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="TRACKING_URI",
        help="log params, metrics and the saved model to MLflow (default store: ./mlruns)",
    )
    group.add_argument(
        "--mlflow-experiment", metavar="NAME", help="MLflow experiment name (default: finetune)"
    )
    _hamilton_ui_flags(group)
    if command == "train":
        group.add_argument(
            "--dag",
            metavar="PATH",
            help=f"draw the dataflow to PATH first, as `{PROG} dag PATH` does; only draws "
            "unless data_path is given",
        )
        group.add_argument(
            "--dag-stage",
            choices=[*finetune_module.STAGE_NAMES, "all"],
            help="with --dag: draw this stage's nodes in full (all: every node)",
        )


def _hamilton_ui_flags(group: Any) -> None:
    """The flags of tracking in the Hamilton UI (`finetune_module.ui_tracking`)."""
    group.add_argument(
        "--hamilton-ui",
        type=int,
        metavar="PROJECT_ID",
        help="record the run in the Hamilton UI (`hamilton ui`), in this project (its id on the "
        "UI's Projects page); needs --hamilton-ui-username",
    )
    group.add_argument(
        "--hamilton-ui-username",
        metavar="NAME",
        help="with --hamilton-ui: the name (an email) you log in to the UI with",
    )
    group.add_argument(
        "--hamilton-ui-url",
        metavar="URL",
        help="with --hamilton-ui: the server's address (default: HAMILTON_API_URL, else "
        "http://localhost:8241)",
    )
    group.add_argument(
        "--hamilton-ui-dag-name",
        metavar="NAME",
        help="with --hamilton-ui: the name the dataflow is listed under (default: finetune)",
    )
    group.add_argument(
        "--hamilton-ui-tag",
        action=_KeyValues,
        metavar="KEY=VALUE",
        help="with --hamilton-ui: a tag of the run (repeat it for more), besides start, source, "
        "model_id and the package's version",
    )


#: The functions whose keyword parameters are the flags of `predict` and `export`, each with
#: the parameters the command gives it otherwise.
FUNCTION_FLAGS = {
    "predict": ((finetune_module.predict, ("texts",)), (finetune_module.read_texts, ("path",))),
    "export": ((finetune_module.export_merged, ()),),
}


def _function_flags(command: str) -> list[Flag]:
    """The flags of `predict` or `export`: a keyword of each function it calls."""
    return [
        flag
        for function, skip in FUNCTION_FLAGS[command]
        for flag in function_inputs(function, command, skip)
    ]


def _function_parser(command: str, description: str) -> Any:
    """`finetune predict` and `finetune export`: a flag for each keyword of the functions they
    call (`FUNCTION_FLAGS`)."""
    parser = _new_parser(command, description)
    for flag in _function_flags(command):
        add_flag(parser, flag)
    return parser


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """The parser of one of the `COMMANDS`."""
    if command in ("train", "evaluate", "sweep"):
        return _dataflow_parser(command)
    if command == "predict":
        parser = _function_parser(
            command,
            "Answer questions with a saved fine-tune (batched, greedy by default). Prints one "
            "answer per line, in the order of the questions (those given here first, then "
            "those of --file).",
        )
        parser.usage = f"{PROG} predict [--model_dir DIR] [QUESTION ...] [--file PATH] [flags]"
        parser.add_argument("questions", nargs="*", metavar="QUESTION", help="questions to answer")
        parser.add_argument(
            "--file",
            metavar="PATH",
            help="more questions: records holding input_text_key in a .json, .jsonl, .csv, "
            ".tsv or .parquet file (a .json list may hold plain strings); any other file is "
            "read as one question per line",
        )
        parser.add_argument(
            "--jsonl",
            action="store_true",
            help='print JSON Lines {"question": ..., "prediction": ...} instead of bare answers',
        )
        return parser
    if command == "export":
        return _function_parser(
            command,
            "Merge a saved LoRA adapter into its base model and save a plain model directory "
            "(safetensors, tokenizer, finetune_settings.json) that loads without peft.",
        )
    if command == "dag":
        parser = _new_parser(command, "Draw the dataflow (Graphviz's dot draws the picture).")
        parser.add_argument(
            "path",
            nargs="?",
            default="dag.png",
            help="the picture: .png, .svg, .pdf or .dot (default: dag.png)",
        )
        parser.add_argument(
            "--stage",
            choices=[*finetune_module.STAGE_NAMES, "all"],
            help="draw this stage's nodes in full (all: every node); default: one box per stage, "
            "with the values that pass between stages",
        )
        _config_flags(parser, start=True)
        parser.add_argument(
            "--model_type",
            "--model-type",
            choices=finetune_module.MODEL_TYPES,
            help="the kind of model (default: seq2seq)",
        )
        parser.add_argument(
            "--full-finetune",
            "--no-lora",
            dest="use_lora",
            action="store_const",
            const=False,
            help="the dataflow of a full fine-tune (no LoRA)",
        )
        return parser
    raise SettingsError(f"Unknown command {command!r}; known: {', '.join(COMMANDS)}.")


# --- reading the command line -------------------------------------------------------------------

_UNSET = object()


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The values of the flags given on the command line, and only those (a default never
    hides a value of the --config file)."""
    namespace = argparse.Namespace(**{action.dest: _UNSET for action in parser._actions})
    parser.parse_args(list(argv), namespace)
    return {name: value for name, value in vars(namespace).items() if value is not _UNSET}


def _read_config(path: str, known: set[str]) -> dict[str, Any]:
    """The settings of a --config YAML file: a mapping of known names to values."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = yaml.safe_load(f) or {}
    except OSError as e:
        raise SettingsError(f"--config {path}: cannot be read ({e.strerror}).") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SettingsError(f"--config {path}: not valid YAML ({' '.join(str(e).split())}).") from e
    if not isinstance(settings, dict):
        raise SettingsError(f"--config {path}: must hold a mapping of input names to values.")
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SettingsError(
            f"Unknown settings in the config file: {', '.join(map(str, unknown))}. "
            f"Known: {', '.join(sorted(known))}."
        )
    return settings


def settings_from(argv: Sequence[str], command: str = "train") -> dict[str, Any]:
    """The settings of a dataflow command: the --config file's, overridden by the flags given."""
    parser = build_parser(command)
    flags = given_flags(parser, argv)
    flags.pop("debug", None)
    settings: dict[str, Any] = {}
    if "config" in flags:
        known = {action.dest for action in parser._actions} - {"help", "version", "config"}
        settings = _read_config(flags.pop("config"), known | {"start"})
    if "extra_training_args" in flags:
        flags["extra_training_args"] = {
            **(settings.get("extra_training_args") or {}),
            **flags["extra_training_args"],
        }
    settings.update(flags)
    return settings


# --- running the commands -----------------------------------------------------------------------

# settings of a dataflow command that are not inputs (the driver config is CONFIG_KEYS)
CLI_ONLY = (
    "dag",
    "dag_stage",
    "cache",
    "mlflow",
    "mlflow_experiment",
    "hamilton_ui",
    "hamilton_ui_username",
    "hamilton_ui_url",
    "hamilton_ui_dag_name",
    "hamilton_ui_tag",
)
# settings of `finetune sweep` that are the sweep's own (keywords of `finetune_module.sweep.sweep`)
SWEEP_OPTIONS = (
    "search_space",
    "n_trials",
    "storage",
    "study_name",
    "objective",
    "sampler",
    "pruner",
)


def _adapters(cli: dict[str, Any]) -> list[Any]:
    """The driver adapters the command line asks for: MLflow tracking with --mlflow, tracking
    in the Hamilton UI with --hamilton-ui."""
    adapters = []
    if "mlflow" in cli:
        from finetune_module.tracking import DEFAULT_EXPERIMENT, mlflow_tracker

        experiment = cli.get("mlflow_experiment") or DEFAULT_EXPERIMENT
        adapters.append(mlflow_tracker(cli["mlflow"] or None, experiment))
    if cli.get("hamilton_ui") is not None:
        adapters.append(_hamilton_ui_tracker(cli))
    return adapters


def _hamilton_ui_tracker(cli: dict[str, Any]) -> Any:
    """The Hamilton UI tracker of the --hamilton-ui flags (the server is asked first: one that
    does not answer stops the command before anything runs)."""
    if not cli.get("hamilton_ui_username"):
        raise SettingsError(
            "--hamilton-ui needs --hamilton-ui-username: the name (an email) you log in to the "
            "Hamilton UI with."
        )
    from finetune_module.ui_tracking import DEFAULT_DAG_NAME, hamilton_ui_tracker

    return hamilton_ui_tracker(
        int(cli["hamilton_ui"]),
        cli["hamilton_ui_username"],
        dag_name=cli.get("hamilton_ui_dag_name") or DEFAULT_DAG_NAME,
        tags=cli.get("hamilton_ui_tag"),
        api_url=cli.get("hamilton_ui_url"),
    )


def progress_adapters(quiet: bool) -> list[Any]:
    """Hamilton's progress bar over the DAG's nodes, shown on a terminal by the main process
    unless `quiet` (in a log or a pipe its redrawn line would only be noise, ahead of the
    one-line error a bad input gets)."""
    if quiet or not sys.stderr.isatty() or not distributed.is_main_process():
        return []
    from hamilton.plugins import h_tqdm

    return [h_tqdm.ProgressBar(desc=PROG)]


def check_types(dr: driver.Driver, settings: dict[str, Any]) -> None:
    """Refuses settings whose type does not fit the dataflow's input, one line per setting
    (a YAML file can hold any type)."""
    types_ = {v.name: v.type for v in dr.list_available_variables() if v.is_external_input}
    wrong = []
    for name, value in settings.items():
        if name in types_ and not htypes.check_input_type(types_[name], value):
            hint = ""
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    float(value)
                    hint = " (YAML reads numbers like 1e-3 as text: write 0.001 or 1.0e-3)"
            wrong.append(f"{name} must be {_type_name(types_[name])}, got {value!r}{hint}")
    if wrong:
        raise SettingsError("; ".join(wrong) + ".")


def _print_summary(
    result: dict[str, Any], start: str, seconds: float, stage_seconds: dict[str, float]
) -> None:
    """A short account of the run: metrics, a few answers, where the files went, and the wall
    time of each stage (the whole run's; the report's own stops before the report)."""
    metrics = result["training_and_validation_set_metrics"]
    print(f"\nDone in {seconds:.1f} s ({start}).")
    if stage_seconds:
        times = ", ".join(f"{stage} {value:.1f} s" for stage, value in stage_seconds.items())
        print(f"  stages: {times}")
    shown = (
        "train_loss",
        "eval_loss",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "accuracy",
        "macro_f1",
        "train_runtime",
        "train_samples_per_second",
    )
    for key in shown:
        if metrics.get(key) is not None:
            print(f"  {key:26s} {metrics[key]:.4f}")
    predictions = result["hold_out_set_predictions"]
    print(f"Hold-out answers ({len(predictions)}):")
    for question, prediction, _ in predictions[:3]:
        print(f"  Q: {question[:90]}\n  A: {prediction[:90]}")
    print(f"Saved to: {result['save_best_models']}")
    print(f"Report: {os.path.join(result['save_best_models'], REPORT_FILE)}")


def _print_cache_use(dr: Any, cache_dir: str) -> None:
    """Which results the run took from the cache and which it computed."""
    from hamilton.caching.adapter import CachingEventType

    logs = dr.cache.logs(dr.cache.last_run_id, level="debug")

    def nodes(kind: Any) -> list[str]:
        return sorted(
            name for name, events in logs.items() if any(e.event_type == kind for e in events)
        )

    taken, computed = nodes(CachingEventType.GET_RESULT), nodes(CachingEventType.EXECUTE_NODE)
    print(f"Cache {cache_dir}: re-used {len(taken)} results ({', '.join(taken) or 'none'})")
    print(f"  computed {len(computed)} ({', '.join(computed)})")


@contextlib.contextmanager
def _quiet_output(quiet: bool) -> Iterator[None]:
    """With --quiet, while the command runs: no log lines below warnings (ours or the
    libraries'), and none of the libraries' own progress bars and warnings; the summary and
    errors only."""
    if not quiet:
        yield
        return
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with quiet_libraries():
            yield
    finally:
        root.setLevel(level)


def _draw(dr: driver.Driver, path: str, stage: str | None, start: str) -> None:
    """Draws the driver's dataflow to `path` and says so."""
    finetune_module.draw_dag(dr, path, stage)
    print(f"Drew the dataflow ({start}) to {path}")


def run_dataflow(argv: Sequence[str], command: str) -> int:
    """`finetune train` and `finetune evaluate`: runs the dataflow with the settings given."""
    settings = settings_from(argv, command)
    cli = {name: settings.pop(name) for name in CLI_ONLY if name in settings}
    start = "presaved" if command == "evaluate" else settings.pop("start", "base")
    settings.pop("start", None)
    config = {k: settings.pop(k) for k in finetune_module.CONFIG_KEYS[1:] if k in settings}
    config.setdefault("source", "file")  # named in the DAG picture and MLflow params
    quiet = settings.get("quiet", False)
    timer = finetune_module.timing_adapter()  # each stage's wall time
    adapters = [*_adapters(cli), *progress_adapters(quiet), timer]
    dr = finetune_module.build_driver(start, cache=cli.get("cache"), adapters=adapters, **config)
    if cli.get("dag"):
        _draw(dr, cli["dag"], cli.get("dag_stage"), start)
        if "data_path" not in settings:
            return 0
    if "data_path" not in settings:
        raise SettingsError("--data (or data_path in --config) is required.")
    for name, value in CLI_DEFAULTS.items():
        settings.setdefault(name, value)
    outputs = list(finetune_module.DEFAULT_OUTPUTS)
    check_types(dr, settings)
    try:  # anything else Hamilton would refuse, before anything runs
        dr.validate_execution(outputs, inputs=settings)
    except ValueError as e:
        raise SettingsError(" ".join(str(e).split())) from e
    # the run's directory is taken before anything runs: a second run into it stops at once
    output_dir = settings.get("output_dir", DEFAULT_RUN_DIR)
    lock = RunLock(output_dir, hold=distributed.is_main_process())  # until the run ends
    began = time.perf_counter()
    try:
        with _quiet_output(quiet):
            result = dr.execute(outputs, inputs=settings)
    finally:  # success or failure: this process's runs in the directory are over
        release_directory(output_dir)
        del lock
    if distributed.is_main_process():
        stage_seconds = (timer.readings or {}).get("stage_seconds", {})
        _print_summary(result, start, time.perf_counter() - began, stage_seconds)
        if cli.get("cache"):
            _print_cache_use(dr, cli["cache"])
    distributed.end()
    return 0


def run_sweep(argv: Sequence[str], command: str = "sweep") -> int:
    """`finetune sweep`: runs the trials of a sweep (`finetune_module.sweep.sweep`) with the
    settings given, the search space from --config or --search-space."""
    from finetune_module.sweep import sweep

    settings = settings_from(argv, command)
    cli = {name: settings.pop(name) for name in CLI_ONLY if name in settings}
    options = {name: settings.pop(name) for name in SWEEP_OPTIONS if name in settings}
    if settings.pop("start", "base") != "base":
        raise SettingsError("A sweep fine-tunes: start must be base.")
    if "search_space" not in options:
        raise SettingsError(
            "A sweep needs a search space: search_space in --config, or --search-space."
        )
    config = {k: settings.pop(k) for k in finetune_module.CONFIG_KEYS[1:] if k in settings}
    config.setdefault("source", "file")
    if "data_path" not in settings:
        raise SettingsError("--data (or data_path in --config) is required.")
    for name in ("input_text_key", "output_text_key"):
        settings.setdefault(name, CLI_DEFAULTS[name])
    check_types(finetune_module.build_driver("base", **config), settings)
    quiet = settings.get("quiet", False)
    adapters = [*_adapters(cli), *progress_adapters(quiet)]
    began = time.perf_counter()
    with _quiet_output(quiet):
        result = sweep(
            settings,
            options.pop("search_space"),
            **options,
            config=config,
            cache=cli.get("cache"),
            adapters=adapters,
        )
    states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(result.states.items()))
    print(f"\nRan {result.trials_run} trials in {time.perf_counter() - began:.1f} s ({states}).")
    print(f"Study {result.study_name!r} in {result.storage}")
    if result.best_trial is not None:
        print(f"Best trial: {result.best_trial} ({result.best_value:.4f}) {result.best_params}")
    print(f"Best model: {result.best_model_dir}")
    print(f"Report: {result.report_path}")
    return 0


def _function_settings(argv: Sequence[str], command: str) -> dict[str, Any]:
    """The flags given to `predict` or `export`, with the command line's defaults; a missing
    required one is refused."""
    parser = build_parser(command)
    flags = {
        action.dest: action.default
        for action in parser._actions
        if action.dest not in ("help", "version")
    }
    flags.update(given_flags(parser, argv))
    flags.pop("debug")
    for flag in _function_flags(command):
        if flag.default is REQUIRED and flag.name not in CLI_DEFAULTS and flags[flag.name] is None:
            option = (*ALIASES.get(flag.name, ()), f"--{flag.name}")[0]
            raise SettingsError(f"{option} is required.")
    return flags


def run_predict(argv: Sequence[str], command: str = "predict") -> int:
    """`finetune predict`: prints the saved fine-tune's answers."""
    settings = _function_settings(argv, command)
    questions = list(settings.pop("questions"))
    path, key = settings.pop("file"), settings.pop("input_text_key")
    jsonl = settings.pop("jsonl")
    if path:
        questions += finetune_module.read_texts(path, key)
    if not questions:
        raise SettingsError("Give questions to answer, or --file.")
    with _quiet_output(settings["quiet"]):
        answers = finetune_module.predict(texts=questions, **settings)
    for question, answer in zip(questions, answers, strict=True):
        if jsonl:
            print(json.dumps({"question": question, "prediction": answer}, ensure_ascii=False))
        else:
            print(" ".join(answer.splitlines()))
    return 0


def run_export(argv: Sequence[str], command: str = "export") -> int:
    """`finetune export`: writes the merged model."""
    settings = _function_settings(argv, command)
    with _quiet_output(settings["quiet"]):
        path = finetune_module.export_merged(**settings)
    print(f"Exported the merged model to {path}")
    return 0


def run_dag(argv: Sequence[str], command: str = "dag") -> int:
    """`finetune dag`: draws the dataflow of the config given."""
    flags = given_flags(build_parser(command), argv)
    path, stage = flags.pop("path", "dag.png"), flags.pop("stage", None)
    flags.pop("debug", None)
    start = flags.pop("start", "base")
    flags.setdefault("source", "file")
    _draw(finetune_module.build_driver(start, **flags), path, stage, start)
    return 0


RUNNERS = {
    "train": run_dataflow,
    "evaluate": run_dataflow,
    "predict": run_predict,
    "export": run_export,
    "dag": run_dag,
    "sweep": run_sweep,
}


class _MaskCredentials(logging.Filter):
    """Masks URL passwords in every log line (Hamilton logs a failing node's inputs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = finetune_module.mask_credentials(record.getMessage())
        record.args = None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = finetune_module.mask_credentials(text)
            record.exc_info = None
        return True


def _logging(debug: bool) -> None:
    """Log lines as plain messages, URL passwords masked. Library log lines go through the
    root handler only: huggingface_hub (and transformers under CI) has a handler of its own and
    also passes its lines on to the root, which printed each of them twice. The hub's HTTP
    client logs no line per request; Hamilton's own lines only with --debug."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_MaskCredentials())
    for name in ("huggingface_hub", "transformers"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("hamilton").setLevel(logging.WARNING if debug else logging.CRITICAL)


def _failure(error: BaseException, debug: bool) -> int:
    """The exit status of a failed command, after its one-line account on stderr."""
    if debug:
        raise error
    mask = finetune_module.mask_credentials
    if isinstance(error, finetune_module.FinetuneInputError):
        print(f"error: {mask(str(error))}", file=sys.stderr)
        return 2
    if isinstance(error, finetune_module.StorageError):  # the disk or its permissions refused
        print(f"error: {mask(error.strerror or str(error))}", file=sys.stderr)
        return 3
    if isinstance(error, KeyboardInterrupt):
        print(
            "error: interrupted. Saved models are complete or untouched; run again with "
            "--resume_from_checkpoint to continue training from the last checkpoint.",
            file=sys.stderr,
        )
        return 130
    message = mask(f"{type(error).__name__}: {error}")
    print(f"error: {message} (run with --debug for the traceback)", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command of the command line (`train` when none is named); returns the exit
    status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    debug = "--debug" in argv
    _logging(debug)
    try:
        return RUNNERS[command](argv, command)
    except (Exception, KeyboardInterrupt) as e:
        return _failure(e, debug)
