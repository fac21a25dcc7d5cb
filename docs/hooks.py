"""MkDocs hooks: the pages and pictures generated from the code at build time, so that the site
always shows the code as it is and the repository holds no generated files.

- `dag/<start>.svg`: the overview of the dataflow for each start ("base", "presaved"), and
  `dag/<stage>.svg`: each stage's nodes in full (start "base"), drawn by
  `finetune_module.draw_dag` with Graphviz's `dot`;
- `reference/stages/<stage>.md`: each stage's API reference (its nodes, from their docstrings)
  under its picture;
- `reference/engine.md`: the API reference of every engine module;
- `reference/cli.md`: each subcommand's `--help`, from the parsers the command line itself uses.

mkdocs.yml names this file under `hooks:`; mkdocs calls `on_files` once per build.
"""

import os
import pkgutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

#: The width, in columns, of the generated `--help` texts.
HELP_WIDTH = 80

ENGINE_INTRO = """# Engine

What the nodes call: plain functions and classes with public names, usable without Hamilton.
`predict`, `export_merged` and the command line use them directly. Which module holds what, in
short: [the dataflow](../dataflow.md#the-engine).
"""

CLI_INTRO = """# Command-line reference

What each subcommand's `--help` prints, generated from the parsers that `finetune` itself uses
(`finetune_module.cli.build_parser`). Every input of the dataflow is a flag; how flags, YAML
files and exit statuses work: [the command line](../command-line.md).
"""


def dag_pictures() -> Iterator[tuple[str, bytes]]:
    """The DAG pictures, as (path in the site, SVG): the overview of each start, then each stage
    of start "base" in full."""
    import finetune_module

    drivers = {start: finetune_module.build_driver(start) for start in ("base", "presaved")}
    drawings = [(start, dr, None) for start, dr in drivers.items()]
    drawings += [(stage, drivers["base"], stage) for stage in finetune_module.STAGE_NAMES]
    with tempfile.TemporaryDirectory() as tmp:
        for name, dr, stage in drawings:
            path = finetune_module.draw_dag(dr, str(Path(tmp) / f"{name}.svg"), stage=stage)
            yield f"dag/{name}.svg", Path(path).read_bytes()


def stage_page(stage: str) -> str:
    """The API reference page of one stage: its picture, then its module's docstring and nodes."""
    return (
        f"# {stage.capitalize()} stage\n\n"
        f"[![The {stage} stage's nodes, with what comes in from other stages]"
        f"(../../dag/{stage}.svg)](../../dag/{stage}.svg)\n\n"
        f"::: finetune_module.{stage}\n"
    )


def engine_page() -> str:
    """The API reference page of the engine: every module of `finetune_module.engine`, by
    name."""
    import finetune_module.engine

    names = sorted(module.name for module in pkgutil.iter_modules(finetune_module.engine.__path__))
    sections = [
        f"::: finetune_module.engine.{name}\n    options:\n      show_root_heading: true\n"
        for name in names
    ]
    return "\n".join([ENGINE_INTRO, *sections])


def cli_page() -> str:
    """The command-line reference page: each subcommand's `--help`, `HELP_WIDTH` columns
    wide."""
    from finetune_module import cli

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)  # argparse wraps to the terminal's width
    try:
        helps = {command: cli.build_parser(command).format_help() for command in cli.COMMANDS}
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    sections = [
        f"## `finetune {command}`\n\n```text\n{text.rstrip()}\n```\n"
        for command, text in helps.items()
    ]
    return "\n".join([CLI_INTRO, *sections])


def generated_files() -> Iterator[tuple[str, str | bytes]]:
    """Every generated file, as (path in the docs, content)."""
    import finetune_module

    yield from dag_pictures()
    for stage in finetune_module.STAGE_NAMES:
        yield f"reference/stages/{stage}.md", stage_page(stage)
    yield "reference/engine.md", engine_page()
    yield "reference/cli.md", cli_page()


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """The docs' files with the generated ones added."""
    for path, content in generated_files():
        files.append(File.generated(config, path, content=content))
    return files
