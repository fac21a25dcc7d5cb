"""What a person sees after a run: base vs fine-tuned ROUGE, the training log, the HTML report
(rendered in a real headless Chromium when one is installed)."""

import datetime
import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hamilton import driver

import finetune_module
from finetune_module.engine import run_info
from finetune_module.engine.metrics import ROUGE_KEYS
from finetune_module.engine.run_info import differing_settings, records_fingerprint
from finetune_module.engine.trainer import TRAINING_LOG_COLUMNS, log_table
from finetune_module.report import report_html
from tests.conftest import EXAMPLE_DATA, QUICK, read_json

FIGURE_IDS = ("loss-curves", "rouge", "lengths")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def test_metrics_hold_base_and_finetuned_rouge_with_the_gain(base_run: dict[str, Any]) -> None:
    metrics = base_run["result"]["training_and_validation_set_metrics"]
    saved = read_json(Path(base_run["result"]["save_best_models"]) / "metrics.json")
    comparison = saved["base_vs_finetuned"]
    assert set(comparison) == {"validation", "hold_out"}
    for key in ROUGE_KEYS:
        assert 0 <= metrics[f"base_{key}"] <= 100
        assert metrics[f"{key}_gain"] == pytest.approx(metrics[key] - metrics[f"base_{key}"])
        assert comparison["validation"]["base"][key] == metrics[f"base_{key}"]
        assert comparison["validation"]["finetuned"][key] == metrics[key]
        assert comparison["hold_out"]["finetuned"][key] == saved["hold_out"][key]
        assert comparison["hold_out"]["gain"][key] == pytest.approx(
            saved["hold_out"][key] - comparison["hold_out"]["base"][key]
        )


def test_base_answers_come_from_the_base_model_with_the_adapter_off(
    base_run: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    base_answers = _csv(saved / "base_model_predictions.csv")
    assert list(base_answers.columns) == ["set", "question", "prediction", "reference"]
    hold_out = base_answers[base_answers["set"] == "hold_out"]
    tuned = base_run["result"]["hold_out_set_predictions"]
    assert list(hold_out["question"]) == [question for question, _, _ in tuned]
    assert list(base_answers["set"]).count("validation") == len(
        base_run["result"]["finetuned_model_on_validation_set"]["validation_predictions"]
    )
    # the untouched base model, with the run's caps, answers exactly as the adapter-off model did
    plain_base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, plain_base)
    shutil.copy(saved / "finetune_settings.json", plain_base)
    questions = list(hold_out["question"])
    assert finetune_module.predict(str(plain_base), questions) == list(hold_out["prediction"])
    # ... and not as the fine-tune does: the adapter really was switched off, then back on
    assert list(hold_out["prediction"]) != [prediction for _, prediction, _ in tuned]


def test_training_log_is_saved_and_matches_the_trainer(base_run: dict[str, Any]) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    log = pd.read_csv(saved / "training_log.csv")
    assert tuple(log.columns[: len(TRAINING_LOG_COLUMNS)]) == TRAINING_LOG_COLUMNS
    checkpoint = Path(
        base_run["result"]["training_and_validation_set_metrics"]["best_model_checkpoint"]
    )
    history = read_json(checkpoint / "trainer_state.json")["log_history"]
    losses = log.dropna(subset=["loss"])
    evaluations = log.dropna(subset=["eval_loss"])
    assert list(losses["loss"]) == pytest.approx([e["loss"] for e in history if "loss" in e])
    assert list(evaluations["eval_loss"]) == pytest.approx(
        [e["eval_loss"] for e in history if "eval_loss" in e]
    )
    assert len(evaluations) == 2 and list(evaluations["epoch"]) == [1.0, 2.0]
    assert losses["learning_rate"].notna().all() and (losses["learning_rate"] > 0).all()
    assert log["elapsed_seconds"].is_monotonic_increasing and (log["elapsed_seconds"] > 0).all()
    assert log["step"].is_monotonic_increasing
    assert "train_runtime" not in log.columns  # the end-of-training summary is in metrics.json


def test_presaved_training_log_is_the_one_saved_with_the_model(base_run: dict[str, Any]) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    dr = (
        driver.Builder()
        .with_config({"start": "presaved"})
        .with_modules(*finetune_module.MODULES)
        .build()
    )
    from_best = dr.execute(["training_log"], inputs={"presaved_model_path": str(saved)})
    pd.testing.assert_frame_equal(
        from_best["training_log"], pd.read_csv(saved / "training_log.csv"), check_dtype=False
    )
    checkpoint = base_run["result"]["training_and_validation_set_metrics"]["best_model_checkpoint"]
    from_checkpoint = dr.execute(["training_log"], inputs={"presaved_model_path": checkpoint})
    columns = ["step", "loss", "eval_loss", "elapsed_seconds"]
    pd.testing.assert_frame_equal(
        from_checkpoint["training_log"][columns], from_best["training_log"][columns]
    )


def test_report_is_one_self_contained_file(base_run: dict[str, Any]) -> None:
    page = (Path(base_run["result"]["save_best_models"]) / "report.html").read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    markup = re.sub(r"<script\b.*?</script>", "", page, flags=re.DOTALL)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", markup)  # nothing fetched
    assert not re.search(r"<script[^>]*\bsrc=", page) and "Plotly.newPlot" in page
    assert len(page) > 1_000_000  # plotly.js itself is inside
    for figure_id in FIGURE_IDS:
        assert f'id="{figure_id}"' in page
    base_answers = _csv(Path(base_run["result"]["save_best_models"]) / "base_model_predictions.csv")
    for question, prediction, reference in base_run["result"]["hold_out_set_predictions"]:
        for text in (question, prediction, reference):
            assert f"<td>{html.escape(text)}</td>" in page
    for text in base_answers[base_answers["set"] == "hold_out"]["prediction"]:
        assert f"<td>{html.escape(text)}</td>" in page


def _description(**changes: Any) -> dict[str, Any]:
    """A made-up description of what ran (`run_description`'s shape)."""
    described = {
        "model": {"model_id": "tiny-model", "model_type": "seq2seq", "lora": {"r": 16}},
        "data": {
            "source": "data.json",
            "fingerprint": "ab" * 32,
            "fingerprint_covers": "the texts",
            "records": {"read": 4, "train": 2, "validation": 1, "hold_out": 1},
        },
        "settings_changed": {"learning_rate": {"value": 0.005, "default": 0.001}},
        "versions": {"python": "3", "torch": "2"},
        "device": {"device": "cpu", "torch_threads": 2},
        "started_at": None,
        "stage_seconds": {},
        "note": "not recorded: no timer",
        "described_at": "2026-01-01T00:00:00+00:00",
    }
    return {**described, **changes}


def _minimal_report(**changes: Any) -> str:
    """A report of made-up figures (no model needed)."""
    scores = dict.fromkeys(ROUGE_KEYS, 10.0)
    comparison = {"base": scores, "finetuned": scores, "gain": dict.fromkeys(ROUGE_KEYS, 0.0)}
    inputs = {
        "training_log": log_table([]),
        "base_vs_finetuned_metrics": {"validation": comparison, "hold_out": comparison},
        "training_and_validation_set_metrics": {"eval_loss": 1.5},
        "source_token_ids": [[1] * 3, [1] * 9],
        "target_token_ids": [[1] * 4, [1] * 5],
        "source_length_cap": 8,
        "target_length_cap": 5,
        "hold_out_set_predictions": [("<script>alert(1)</script>", "tuned", "ref & more")],
        "base_hold_out_answers": ["base"],
        "run_description": _description(),
    }
    return report_html(**{**inputs, **changes})


def test_report_escapes_texts_and_says_when_there_is_no_training_log() -> None:
    page = _minimal_report()
    assert "<script>alert(1)</script>" not in page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page
    assert "<td>ref &amp; more</td>" in page
    assert "No training log was found" in page and 'id="loss-curves"' not in page
    assert "cap 8: 1 of 2 truncated" in page and "cap 5: 0 of 2 truncated" in page


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a page from disk, with its console written to stderr."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run(
        [CHROMIUM, *flags, *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _figures_in(dom: str) -> dict[str, str]:
    """Each figure's part of the page, from its div's id to the next figure's id."""
    pattern = 'id="({})"'.format("|".join(FIGURE_IDS))
    found = [(m.start(), m.group(1)) for m in re.finditer(pattern, dom)]
    ends = [start for start, _ in found[1:]] + [len(dom)]
    return {name: dom[start:end] for (start, name), end in zip(found, ends, strict=True)}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_without_script_errors(
    base_run: dict[str, Any], tmp_path: Path
) -> None:
    page = Path(base_run["result"]["save_best_models"]) / "report.html"
    out = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "\n".join(console)  # no script errors, nor anything else logged
    figures = _figures_in(out.stdout)
    assert set(figures) == set(FIGURE_IDS)
    for figure_id, drawing in figures.items():
        # plotly filled the empty div with its drawing: SVG layers holding the data's traces
        assert 'class="main-svg"' in drawing, f"figure {figure_id} was not drawn"
    assert re.search(r'class="[^"]*\btrace\b', figures["rouge"])
    assert "cap " in figures["lengths"] and "truncated" in figures["lengths"]
    dom = out.stdout
    what_ran = dom[dom.index("<h2>What ran</h2>") : dom.index("<h2>At a glance</h2>")]
    fingerprint = read_json(page.parent / "run_info.json")["data"]["fingerprint"]
    assert f"<td>{fingerprint}</td>" in what_ran and "<td>training</td>" in what_ran
    widths = _measured_widths(page.read_text("utf-8"), tmp_path)
    assert widths["page"] <= widths["window"], widths


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_a_broken_page_is_caught_by_the_browser_check(tmp_path: Path) -> None:
    """The check above can fail: a figure whose script breaks is reported and not drawn."""
    page = tmp_path / "broken.html"
    page.write_text(
        _minimal_report().replace("Plotly.newPlot(", "Plotly.noSuchFunction(", 1), "utf-8"
    )
    out = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert any("Uncaught" in line for line in out.stderr.splitlines() if ":CONSOLE" in line)
    figures = _figures_in(out.stdout)
    assert 'class="main-svg"' not in figures["rouge"]  # the broken figure
    assert 'class="main-svg"' in figures["lengths"]  # the one after it still drew


def test_report_of_a_full_fine_tune_has_no_base_columns() -> None:
    """A full fine-tune has no adapter to switch off: the report says n/a instead of failing."""
    tuned = {**dict.fromkeys(ROUGE_KEYS, 10.0), "accuracy": 50.0}
    comparison = {"base": {}, "finetuned": tuned, "gain": {}}
    page = _minimal_report(
        base_vs_finetuned_metrics={"validation": comparison, "hold_out": comparison},
        base_hold_out_answers=[],
    )
    assert "<td>n/a</td>" in page and "<td>tuned</td>" in page
    assert '"accuracy"' in page  # class-label metrics are drawn with ROUGE


# --- what ran ---------------------------------------------------------------------------------


def _example_fingerprint() -> str:
    """The fingerprint of the example data's questions and replies, in file order."""
    records = read_json(EXAMPLE_DATA)
    return records_fingerprint([r["question"] for r in records], [r["reply"] for r in records])


def test_run_info_says_what_ran(base_run: dict[str, Any], tiny_model_dir: Path) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    info = read_json(saved / "run_info.json")
    assert Path(info["model"]["model_id"]).resolve() == tiny_model_dir.resolve()
    assert info["model"]["lora"]["r"] == 16 and info["model"]["adapter_path"] is None
    data = info["data"]
    assert data["source"] == str(EXAMPLE_DATA) and data["fingerprint"] == _example_fingerprint()
    result = base_run["result"]
    validation = result["finetuned_model_on_validation_set"]["validation_predictions"]
    counts = data["records"]
    assert counts["read"] == len(read_json(EXAMPLE_DATA))
    assert counts["hold_out"] == len(result["hold_out_set_predictions"])
    assert counts["validation"] == len(validation)
    assert counts["train"] == counts["read"] - counts["validation"] - counts["hold_out"] > 0
    changed = info["settings_changed"]
    assert changed["learning_rate"] == {"value": 5e-3, "default": 1e-3}
    assert changed["model_id"]["default"] == "google/flan-t5-small"
    assert "num_train_epochs" not in changed  # given, but equal to its default (2 == 2.0)
    assert not {"r", "seed", "prompt_template", "split_column"} & set(changed)  # not given
    versions = info["versions"]
    assert versions["finetune_module"] == finetune_module.__version__
    assert {"python", "torch", "transformers", "peft", "hamilton"} <= set(versions)
    assert info["device"]["device"] == "cpu" and info["device"]["torch_threads"] >= 1
    started = datetime.datetime.fromisoformat(info["started_at"])
    described = datetime.datetime.fromisoformat(info["described_at"])
    assert started.tzinfo is not None and started <= described
    stages = info["stage_seconds"]
    in_order = ["settings", "data", "tokenization", "model", "training", "evaluation"]
    assert list(stages)[:6] == in_order
    assert all(seconds > 0 for seconds in stages.values())
    # each figure is rounded to milliseconds: the stages' sum may pass the elapsed time by that
    assert sum(stages.values()) <= info["elapsed_seconds"] + 0.0005 * (len(stages) + 1)


def test_the_report_opens_with_what_ran(base_run: dict[str, Any]) -> None:
    saved = Path(base_run["result"]["save_best_models"])
    page = (saved / "report.html").read_text("utf-8")
    info = read_json(saved / "run_info.json")
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings[0] == "What ran"
    what_ran = page[page.index("<h2>What ran</h2>") : page.index("<h2>At a glance</h2>")]
    for text in (info["model"]["model_id"], info["data"]["source"], info["data"]["fingerprint"]):
        assert f"<td>{html.escape(text)}</td>" in what_ran
    assert "<td>learning_rate</td><td>0.005</td><td>0.001</td>" in what_ran
    assert "<td>records: hold-out</td>" in what_ran and "<td>training</td>" in what_ran
    assert f"<td>{info['started_at']}</td>" in what_ran
    assert info["part_of"] == {} and "part of:" not in what_ran  # a plain run, not a sweep's


def test_a_labelled_run_states_what_it_is_part_of() -> None:
    with run_info.labelled_run(sweep="s1", trial=3):
        with run_info.labelled_run(trial=4):  # the inner label wins; the outer ones stay
            assert run_info.run_labels() == {"sweep": "s1", "trial": "4"}
        assert run_info.run_labels() == {"sweep": "s1", "trial": "3"}
    assert run_info.run_labels() == {}


def test_data_fingerprint_is_the_same_for_the_same_data_only(tmp_path: Path) -> None:
    questions, answers = ["q1", "q2", "q3"], ["a1", "a2", "a3"]
    fingerprint = records_fingerprint(questions, answers)
    assert fingerprint == records_fingerprint(list(questions), list(answers))
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    changed = [
        records_fingerprint(questions, ["a1", "a2", "a3 "]),  # one answer changed
        records_fingerprint(questions[::-1], answers[::-1]),  # the same records, reordered
        records_fingerprint(questions[:2], answers[:2]),  # one record fewer
        records_fingerprint(["q1a", "q2", "q3"], ["1", "a2", "a3"]),  # text moved across fields
        records_fingerprint(questions, answers, ["train", "train", "test"]),  # a split named
    ]
    assert len({fingerprint, *changed}) == 1 + len(changed)
    # the node: the same records in another file format read alike, a changed record does not
    records = read_json(EXAMPLE_DATA)
    as_lines = tmp_path / "same.jsonl"
    as_lines.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps([{**records[0], "reply": "changed"}, *records[1:]]), "utf-8")
    dr = finetune_module.build_driver("base")
    keys = {"input_text_key": "question", "output_text_key": "reply"}

    def fingerprint_of(path: Path) -> str:
        result = dr.execute(["data_fingerprint"], inputs={"data_path": str(path), **keys})
        return str(result["data_fingerprint"])

    assert fingerprint_of(EXAMPLE_DATA) == fingerprint_of(as_lines) == _example_fingerprint()
    assert fingerprint_of(edited) != _example_fingerprint()


def test_settings_differing_from_their_defaults_are_masked_and_typed() -> None:
    def node(
        url: str = "sqlite:///x.db", n: int = 1, flag: bool = False, rate: float = 1.0
    ) -> None:
        """A node with defaults."""

    given = {"url": "postgresql://me:secret@host/db", "n": 1, "flag": 0, "rate": 1}
    changed = differing_settings(node, given)
    assert changed == {
        "url": {"value": "postgresql://me:***@host/db", "default": "sqlite:///x.db"},
        "flag": {"value": 0, "default": False},  # 0 is not False
    }


def test_presaved_report_says_what_ran_without_a_timer(
    base_run: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A run file built with a plain `driver.Builder()` (no stage timer): the report still says
    what ran, and that the stage times were not recorded."""
    saved = Path(base_run["result"]["save_best_models"])
    dr = (
        driver.Builder()
        .with_config({"start": "presaved"})
        .with_modules(*finetune_module.MODULES)
        .build()
    )
    inputs = {"data_path": str(EXAMPLE_DATA), "input_text_key": "question"}
    inputs |= {"output_text_key": "reply", "presaved_model_path": str(saved)}
    inputs |= {"output_dir": str(tmp_path), "max_new_tokens": QUICK["max_new_tokens"]}
    evaluation = Path(dr.execute(["save_best_models"], inputs=inputs)["save_best_models"])
    info = read_json(evaluation / "run_info.json")
    assert info["model"]["adapter_path"] == str(saved)
    assert Path(info["model"]["model_id"]).resolve() == tiny_model_dir.resolve()
    trained = read_json(saved / "run_info.json")
    assert info["data"] == trained["data"]  # the same data: the same fingerprint and sets
    assert set(info["settings_changed"]) == {"presaved_model_path", "output_dir", "max_new_tokens"}
    assert info["started_at"] is None and info["stage_seconds"] == {}
    assert "timing_adapter()" in info["note"]
    page = (evaluation / "report.html").read_text("utf-8")
    assert "Stage times: not recorded" in page and html.escape(str(saved)) in page


# --- the report in a real browser: long texts wrap inside their cells --------------------------

_MEASURE = """<script>
const page = document.documentElement;
const right = Math.max(...[...document.querySelectorAll("table")].map(
    (t) => t.getBoundingClientRect().right));
document.body.setAttribute("data-measured", JSON.stringify(
    {page: page.scrollWidth, window: window.innerWidth, tables: right}));
</script></body>"""


def _measured_widths(page: str, tmp_path: Path) -> dict[str, float]:
    """The page's scroll width, the window's width and the right edge of its widest table, as
    measured by headless Chromium in a 1000-pixel-wide window."""
    path = tmp_path / "measured.html"
    path.write_text(page.replace("</body>", _MEASURE, 1), "utf-8")
    out = _chromium(path, tmp_path / "profile", "--window-size=1000,800", "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.search(r'data-measured="([^"]*)"', out.stdout)
    assert found, "the measuring script did not run"
    return dict(json.loads(html.unescape(found.group(1))))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_a_long_unbroken_answer_wraps_inside_its_cell(tmp_path: Path) -> None:
    token = "x" * 500  # no space to break at
    page = _minimal_report(
        hold_out_set_predictions=[(f"question {token}", token, "reference")],
        run_description=_description(
            settings_changed={"prompt_template": {"value": "y" * 500, "default": "{input}"}}
        ),
    )
    assert f"<td>{token}</td>" in page
    widths = _measured_widths(page, tmp_path)
    assert widths["window"] == 1000
    assert widths["page"] <= widths["window"], widths  # nothing to scroll sideways
    assert widths["tables"] <= widths["window"], widths
