"""The HTML of a run's report: plotly figures and escaped tables in one self-contained page
(plotly.js is embedded, so the page opens from disk with no network)."""

import html
import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from finetune_module.engine.tokens import TokenLists, token_lengths

_BASE_COLOUR, _TUNED_COLOUR = "#9aa5b1", "#2a6fdb"
_FIGURE_HEIGHT = 420

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1f2933;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
p.how { color: #52606d; max-width: 60em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border: 1px solid #cbd2d9; padding: 0.35em 0.5em; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
th { background: #f0f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.glance, table.facts, table.settings { width: auto; }
td code { font-size: 0.95em; }
"""


def figure_html(figure: go.Figure, div_id: str) -> str:
    """The figure as a `<div>` and the script that draws it (plotly.js is loaded once, above)."""
    figure.update_layout(
        height=_FIGURE_HEIGHT, margin={"t": 90, "b": 50, "l": 60, "r": 30}, template="plotly_white"
    )
    return figure.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,  # fixed ids keep the page the same from run to run
        default_height=f"{_FIGURE_HEIGHT}px",
        config={"displaylogo": False, "responsive": True},
    )


def loss_figure(training_log: pd.DataFrame) -> str:
    """Training and validation loss against the optimizer step, with the learning rate."""
    train = training_log.dropna(subset=["loss"])
    evaluation = training_log.dropna(subset=["eval_loss"])
    if train.empty and evaluation.empty:
        return (
            "<p>No training log was found with this model, so there are no loss curves "
            "(a model saved by this project keeps its log in <code>training_log.csv</code>).</p>"
        )
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_scatter(x=train["step"], y=train["loss"], name="training loss", mode="lines+markers")
    figure.add_scatter(
        x=evaluation["step"],
        y=evaluation["eval_loss"],
        name="validation loss",
        mode="lines+markers",
        marker={"size": 10, "symbol": "diamond"},
    )
    rate = training_log.dropna(subset=["learning_rate"])
    figure.add_scatter(
        x=rate["step"],
        y=rate["learning_rate"],
        name="learning rate",
        mode="lines",
        line={"dash": "dot", "color": _BASE_COLOUR},
        secondary_y=True,
    )
    figure.update_layout(title="Loss per optimizer step")
    figure.update_xaxes(title_text="optimizer step")
    figure.update_yaxes(title_text="cross-entropy per target token", secondary_y=False)
    figure.update_yaxes(
        title_text="learning rate", secondary_y=True, showgrid=False, rangemode="tozero"
    )
    return figure_html(figure, "loss-curves")


def scores_figure(base_vs_finetuned_metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    """ROUGE (and accuracy, macro-F1 for class labels) of the base model and of the fine-tune,
    side by side, per evaluation set (the fine-tune alone when there is no base to compare)."""
    sets = list(base_vs_finetuned_metrics)
    figure = make_subplots(
        rows=1, cols=len(sets), subplot_titles=[name.replace("_", "-") + " set" for name in sets]
    )
    for column, name in enumerate(sets, start=1):
        for model, colour in (("base", _BASE_COLOUR), ("finetuned", _TUNED_COLOUR)):
            scores = base_vs_finetuned_metrics[name][model]
            if not scores:
                continue
            keys = list(scores)
            figure.add_bar(
                x=keys,
                y=[scores[key] for key in keys],
                name="base model" if model == "base" else "fine-tuned",
                marker_color=colour,
                legendgroup=model,
                showlegend=column == 1,
                text=[f"{scores[key]:.1f}" for key in keys],
                textposition="outside",
                row=1,
                col=column,
            )
    figure.update_layout(title="Scores (0-100), base model vs fine-tuned", barmode="group")
    figure.update_yaxes(rangemode="tozero")
    return figure_html(figure, "rouge")


def lengths_figure(
    source_token_ids: TokenLists | Sequence[Sequence[int]],
    target_token_ids: TokenLists | Sequence[Sequence[int]],
    source_length_cap: int,
    target_length_cap: int,
) -> str:
    """Histograms of the input and target lengths in tokens, with the caps marked."""
    parts = (
        ("inputs", source_token_ids, source_length_cap),
        ("targets", target_token_ids, target_length_cap),
    )
    titles = [f"{name} (tokens)" for name, *_ in parts]
    figure = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for column, (name, token_ids, cap) in enumerate(parts, start=1):
        lengths = token_lengths(token_ids)
        over = int((lengths > cap).sum())
        figure.add_histogram(
            x=lengths, name=name, marker_color=_TUNED_COLOUR, showlegend=False, row=1, col=column
        )
        figure.add_vline(
            x=cap,
            line_dash="dash",
            line_color="#c0392b",
            annotation_text=f"cap {cap}: {over} of {len(lengths)} truncated",
            annotation_position="top right",
            row=1,
            col=column,
        )
        figure.update_xaxes(title_text="length in tokens", row=1, col=column)
    figure.update_yaxes(title_text="records", col=1)
    figure.update_layout(title="Token lengths of the whole data set, with the length caps")
    return figure_html(figure, "lengths")


def _cell(value: Any) -> str:
    """A table cell holding the value, escaped (numbers right-aligned, floats to 2 places)."""
    if isinstance(value, float):
        return f'<td class="num">{value:.2f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(header: list[str], rows: list[list[Any]], css_class: str = "") -> str:
    """An HTML table with a header row; every value is escaped."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><tr>{head}</tr>{body}</table>'


def glance_tables(
    base_vs_finetuned_metrics: dict[str, dict[str, dict[str, float]]],
    training_and_validation_set_metrics: dict[str, Any],
) -> str:
    """The headline figures: ROUGE-L base and fine-tuned per set, losses and training time."""
    rows = [
        [
            f"ROUGE-L, {name.replace('_', '-')} set",
            *(parts[part].get("rougeL", "n/a") for part in ("base", "finetuned", "gain")),
        ]
        for name, parts in base_vs_finetuned_metrics.items()
    ]
    scores = table(["", "base model", "fine-tuned", "gain"], rows, "glance")
    figures = [
        (label, training_and_validation_set_metrics.get(key))
        for key, label in (
            ("train_loss", "mean training loss"),
            ("eval_loss", "validation loss of the fine-tune"),
            ("train_runtime", "training time (s)"),
            ("global_step", "optimizer steps"),
        )
    ]
    shown = [[label, value] for label, value in figures if value is not None]
    return scores + ("<br>" + table(["", "value"], shown, "glance") if shown else "")


def _shown_value(value: Any) -> str:
    """A setting's value as text: JSON for lists and mappings, None as `none`."""
    if value is None:
        return "none"
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _stage_times(description: dict[str, Any]) -> str:
    """The table of each stage's wall time, or the note saying they were not recorded."""
    seconds = description.get("stage_seconds") or {}
    if not seconds:
        return f"<p>Stage times: {html.escape(description.get('note', 'not recorded'))}.</p>"
    rows: list[list[Any]] = [[stage, float(value)] for stage, value in seconds.items()]
    rows.append(["all of the above", float(sum(seconds.values()))])
    return (
        "<p>Wall time of each stage's nodes that finished before this report was built (the "
        "report and artifacts stages run after it; <code>finetune</code> prints the whole "
        "run's times at its end).</p>" + table(["stage", "seconds"], rows, "glance")
    )


def what_ran(description: dict[str, Any]) -> str:
    """The "What ran" tables of a run's description (`finetune_module.report.run_description`):
    the model, the data, the settings that differ from their defaults, the date and versions,
    and each stage's wall time."""
    model, data = description["model"], description["data"]
    records = data["records"]
    model_rows = [["model id or path", model["model_id"]], ["model type", model["model_type"]]]
    if model.get("adapter_path"):
        model_rows.append(["adapter", model["adapter_path"]])
    elif model.get("lora"):
        model_rows.append(["adapter", "a fresh LoRA adapter: " + _shown_value(model["lora"])])
    else:
        model_rows.append(["adapter", "none (every weight is the model's own)"])
    data_rows = [
        ["source", data["source"]],
        ["fingerprint", data["fingerprint"]],
        ["fingerprint covers", data["fingerprint_covers"]],
        *([f"records: {name.replace('_', '-')}", count] for name, count in records.items()),
    ]
    changed = [
        [name, _shown_value(entry["value"]), _shown_value(entry["default"])]
        for name, entry in description["settings_changed"].items()
    ]
    settings = (
        table(["setting", "value", "default"], changed, "settings")
        if changed
        else "<p>Every setting is at its default.</p>"
    )
    started = description.get("started_at") or "not recorded (see stage times)"
    when_rows = [["started", started], ["described", description["described_at"]]]
    part_of = description.get("part_of", {}).items()
    when_rows += [[f"part of: {key}", value] for key, value in part_of]
    environment = [*description["versions"].items(), *description["device"].items()]
    return (
        "<h3>Model</h3>"
        + table(["", "value"], model_rows, "facts")
        + "<h3>Data</h3>"
        + table(["", "value"], data_rows, "facts")
        + "<h3>Settings that differ from their defaults</h3>"
        + settings
        + "<h3>When, and on what</h3>"
        + table(["", "value"], [*when_rows, *([k, str(v)] for k, v in environment)], "facts")
        + "<h3>Wall time per stage</h3>"
        + _stage_times(description)
    )


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """A self-contained HTML page: the title, then each section's heading, a line saying how to
    read it, and its content (HTML)."""
    body = "".join(
        f'<h2>{html.escape(heading)}</h2><p class="how">{html.escape(how)}</p>{content}'
        for heading, how, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
