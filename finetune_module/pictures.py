"""Pictures of the dataflow: an overview with one box per stage and the values that pass between
stages, one stage's nodes in full, or every node grouped by stage.

```python
finetune_module.draw_dag(dr, "dag.png")                    # the overview
finetune_module.draw_dag(dr, "training.png", "training")   # one stage in full
finetune_module.draw_dag(dr, "all.svg", "all")             # every node, grouped by stage
```
The pictures are drawn with Graphviz's `dot` from the driver's own graph, so they show the
config the driver was built with (start, model_type, use_lora, source).
"""

import os
import re
import sys
import textwrap
import types
import typing
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import graphviz
from hamilton import driver
from hamilton.node import Node

from finetune_module.errors import SettingsError

#: The stages, in execution order, as the pictures name them (the stage modules' names).
STAGE_NAMES = (
    "settings",
    "data",
    "tokenization",
    "model",
    "training",
    "evaluation",
    "report",
    "artifacts",
)
INPUTS = "inputs"  # the box of the driver's external inputs
DEPRECATED = "deprecated"  # the module of deprecated names, left out of the pictures
FORMATS = ("png", "svg", "pdf", "dot")
_FONT = "Helvetica"
_STAGE_COLOUR, _INPUT_COLOUR, _OUTPUT_COLOUR = "#dbe7f7", "#f3f4f6", "#fde9c8"
_FLOW_COLOUR, _SETTING_COLOUR = "#1f2933", "#9aa5b1"  # data between stages; settings, inputs


def _stage_of(node: Node) -> str:
    """The stage a node belongs to (its module's name), or `inputs` for an external input."""
    if node.user_defined:
        return INPUTS
    return node.originating_functions[0].__module__.rsplit(".", 1)[-1]


def _first_line(text: str | None) -> str:
    """The first sentence of a docstring, without its stage prefix ("Data stage: ...") and
    without remarks in parentheses."""
    line = (text or "").strip().split("\n\n")[0].replace("\n", " ")
    line = re.sub(r" \([^)]*\)", "", line.split(": ", 1)[-1])
    return line.split(". ")[0].rstrip(".")


def _wrapped(names: Iterable[str], width: int = 34) -> str:
    """Names joined by commas, wrapped to lines of about `width` characters (never inside a
    name)."""
    text = ", ".join(names)
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False))


def _graph(title: str) -> graphviz.Digraph:
    """An empty top-to-bottom picture with the pictures' fonts and a title."""
    graph = graphviz.Digraph(graph_attr={"rankdir": "TB", "label": title, "labelloc": "t"})
    graph.attr(fontname=_FONT, fontsize="18", nodesep="0.35", ranksep="0.45")
    graph.attr("node", fontname=_FONT, fontsize="11", shape="box", style="rounded,filled")
    graph.attr("edge", fontname=_FONT, fontsize="9", color="#52606d")
    return graph


def _crossings(nodes: list[Node]) -> dict[tuple[str, str], list[str]]:
    """The values passing from one stage (or the inputs) to another: (from, to) -> names."""
    passing: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node in nodes:
        for dependency in node.dependencies:
            ends = (_stage_of(dependency), _stage_of(node))
            if ends[0] != ends[1] and dependency.name not in passing[ends]:
                passing[ends].append(dependency.name)
    return passing


def _overview(nodes: list[Node], outputs: tuple[str, ...], title: str) -> graphviz.Digraph:
    """One box per stage (its purpose and node count), an arrow per pair of stages labelled
    with the values that pass, the inputs above and the four outputs below."""
    graph = _graph(title)
    by_stage: dict[str, list[Node]] = defaultdict(list)
    for node in nodes:
        by_stage[_stage_of(node)].append(node)
    modules = {
        _stage_of(n): n.originating_functions[0].__module__ for n in nodes if not n.user_defined
    }
    graph.node(INPUTS, f"inputs ({len(by_stage[INPUTS])})", fillcolor=_INPUT_COLOUR, shape="note")
    for stage in STAGE_NAMES:
        if stage not in by_stage:
            continue
        purpose = textwrap.fill(_first_line(sys.modules[modules[stage]].__doc__), 44)
        count = len(by_stage[stage])
        label = f"{stage}\n{purpose}\n({count} node{'s' if count > 1 else ''})"
        graph.node(stage, label, fillcolor=_STAGE_COLOUR)
    for (source, target), names in _crossings(nodes).items():
        shown = names if len(names) <= 6 else [*names[:5], f"... {len(names) - 5} more"]
        # what settles the run (inputs, settings) in light dashes; the data flow in full
        setting = source in (INPUTS, "settings")
        graph.edge(
            source,
            target,
            label=_wrapped(shown),
            color=_SETTING_COLOUR if setting else _FLOW_COLOUR,
            fontcolor="#52606d" if setting else _FLOW_COLOUR,
            style="dashed" if setting else "solid",
        )
    graph.node("outputs", _wrapped(outputs, 40), fillcolor=_OUTPUT_COLOUR, shape="note")
    for stage in dict.fromkeys(_stage_of(n) for n in nodes if n.name in outputs):
        graph.edge(stage, "outputs", color=_FLOW_COLOUR, penwidth="2")
    return graph


def _type_name(kind: Any) -> str:
    """A short name of a type: `list`, `ModelRecipe`, `PreTrainedModel | PeftModel`."""
    if hasattr(kind, "__name__") and not typing.get_args(kind):
        return kind.__name__
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(part) for part in typing.get_args(kind))
    return str(kind).replace("typing.", "")


def _node_label(node: Node) -> str:
    """A node's box: its name and the type of its value."""
    return f"{node.name}\n{textwrap.shorten(_type_name(node.type), 40)}"


def _detail(nodes: list[Node], stages: tuple[str, ...], title: str) -> graphviz.Digraph:
    """The nodes of `stages` in full, each stage a frame; what comes in from other stages as
    small notes named by their stage, the inputs each node takes as one note, and what goes
    out to other stages as notes naming them."""
    graph = _graph(title)
    shown = [n for n in nodes if _stage_of(n) in stages]
    names = {n.name for n in shown}
    for stage in stages:
        with graph.subgraph(name=f"cluster_{stage}") as frame:
            frame.attr(label=stage, style="rounded", color=_SETTING_COLOUR)
            for node in shown:
                if _stage_of(node) == stage:
                    frame.node(node.name, _node_label(node), fillcolor=_STAGE_COLOUR)
    note = {"fillcolor": _INPUT_COLOUR, "fontsize": "9", "shape": "note"}
    for node in shown:
        inputs = sorted(d.name for d in node.dependencies if d.user_defined)
        if inputs:
            graph.node(f"inputs of {node.name}", _wrapped(inputs, 60), **note)
            graph.edge(f"inputs of {node.name}", node.name, color=_SETTING_COLOUR)
        for dependency in node.dependencies:
            if dependency.name not in names and not dependency.user_defined:
                label = f"{dependency.name}\n(from {_stage_of(dependency)})"
                graph.node(dependency.name, label, **note)
                graph.edge(dependency.name, node.name)
            elif dependency.name in names:
                graph.edge(dependency.name, node.name)
    for node in shown:
        stages_out = sorted(
            {_stage_of(m) for m in nodes if node in m.dependencies and m.name not in names},
            key=STAGE_NAMES.index,
        )
        if stages_out:
            graph.node(f"{node.name} out", "to " + _wrapped(stages_out, 30), **note)
            graph.edge(node.name, f"{node.name} out", style="dashed")
    return graph


def draw(dr: driver.Driver, path: str, stage: str | None, outputs: Sequence[str]) -> str:
    """Draws the driver's dataflow to `path` (.png, .svg, .pdf or .dot) and returns the path:
    the overview (`stage` None, `outputs` marked), one stage in full, or "all" (see
    `finetune_module.draw_dag`)."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in FORMATS:
        raise SettingsError(f"{path}: draw to one of {', '.join('.' + f for f in FORMATS)}.")
    if stage not in (None, "all", *STAGE_NAMES):
        raise SettingsError(f"stage must be one of {', '.join(STAGE_NAMES)} or all; got {stage!r}.")
    config = dr.graph.config
    keys = ("start", "source", "model_type", "use_lora")
    named = ", ".join(f"{key}={config[key]}" for key in keys if key in config)
    nodes = [n for n in dr.graph.get_nodes() if _stage_of(n) != DEPRECATED]
    used = {d.name for n in nodes for d in n.dependencies}
    nodes = [n for n in nodes if not n.user_defined or n.name in used]
    if stage is None:
        graph = _overview(nodes, tuple(outputs), f"finetune_module ({named})")
    elif stage == "all":
        graph = _detail(nodes, STAGE_NAMES, f"finetune_module, every node ({named})")
    else:
        graph = _detail(nodes, (stage,), f"finetune_module, stage {stage} ({named})")
    try:
        picture = graph.source.encode() if fmt == "dot" else graph.pipe(format=fmt)
    except graphviz.ExecutableNotFound as e:
        raise RuntimeError(
            "Drawing the dataflow needs Graphviz's `dot` (apt-get install graphviz, brew "
            "install graphviz)."
        ) from e
    with open(path, "wb") as f:
        f.write(picture)
    return path
