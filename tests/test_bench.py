"""The benchmark: its FLOP count is right, its data has the intended spread, it runs, and its
peer (the plain Hugging Face script) works on our sets and runs beside it."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hamilton import driver
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    T5Config,
    T5ForConditionalGeneration,
)

from bench import compare
from bench.benchmark import DECODER_FAMILIES, forward_flops, step_bands, training_flops
from bench.data import TOKENIZER_VOCABULARY, build_dataset, training_texts
from bench.peer import tokenized_sets
from bench.peer_causal import tokenized_sets as causal_tokenized_sets
from bench.step_profile import MATMULS
from finetune_module import MODULES
from finetune_module.engine import mkl_kernels
from finetune_module.engine.metrics import ROUGE_KEYS
from finetune_module.tiny_model import train_tokenizer
from tests.conftest import EXAMPLE_DATA, REPO


def _tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=500, d_model=48, d_kv=16, num_heads=4, d_ff=80, num_layers=2,
        num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def test_flop_formula_matches_torchs_flop_counter() -> None:
    model = _tiny_t5().eval()
    config = model.config
    for source, target in ((37, 11), (90, 40)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(
                input_ids=torch.randint(3, 500, (1, source)),
                labels=torch.randint(3, 500, (1, target)),
            )
        assert forward_flops(config, source, target) == counter.get_total_flops()


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_only_flop_formula_matches_torchs_flop_counter(family: str) -> None:
    """A decoder-only pass over a prompt and its answer: every layer over both, the output
    layer over the answer's tokens only (`logits_to_keep`), with key/value heads shared."""
    config = AutoConfig.for_model(
        family, vocab_size=500, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=80, num_hidden_layers=2, attn_implementation="eager",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    for prompt, answer in ((37, 11), (90, 40)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=torch.randint(3, 500, (1, prompt + answer)), logits_to_keep=answer)
        assert forward_flops(config, prompt, answer) == counter.get_total_flops()


def _counted_training_pass(model: torch.nn.Module, source: int, target: int) -> int:
    """torch's count of the products of one training pass (forward and backward) over one
    example, written out here apart from the benchmark's own counting."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        if model.config.is_encoder_decoder:
            out = model(
                input_ids=torch.randint(3, 500, (1, source)),
                labels=torch.randint(3, 500, (1, target)),
            )
        else:
            ids = torch.randint(3, 500, (1, source + target))
            out = model(input_ids=ids, logits_to_keep=target)
        out.logits.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("targets", [["q", "v"], ["k", "o", "wi_1"]], ids=["q-v", "k-o-ffn"])
def test_training_flop_count_is_autograds_at_any_length(family: str, targets: list[str]) -> None:
    """The useful FLOPs of a training pass with LoRA, counted at a few short lengths and
    fitted, are torch's count of a real pass at long ones, and more than twice the forward
    pass: the attention's and the adapters' backward passes take two products each (less
    where the first layer's query, key and value read the embeddings, which need no
    gradient)."""
    if family == "t5":
        model = _tiny_t5()
    else:
        config = AutoConfig.for_model(
            family, vocab_size=500, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=80, num_hidden_layers=2, attn_implementation="eager",
        )  # fmt: skip
        model = AutoModelForCausalLM.from_config(config)
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "wi_1": "up_proj"}
        targets = [names[t] for t in targets]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    per_example = training_flops(model)
    for source, target in ((37, 11), (90, 40)):
        counted = _counted_training_pass(model, source, target)
        assert per_example(source, target) == pytest.approx(counted, rel=1e-12)
        twice_forward = 2 * forward_flops(model.get_base_model().config, source, target)
        assert 1.01 < counted / twice_forward < 1.5


def test_training_flop_count_of_a_full_fine_tune_is_three_forward_passes() -> None:
    """Fully fine-tuned, every weight's gradient is a product too, and the embeddings train,
    so every input needs its gradient: three forward passes exactly."""
    model = _tiny_t5()
    per_example = training_flops(model)
    for source, target in ((37, 11), (90, 40)):
        counted = _counted_training_pass(model, source, target)
        assert per_example(source, target) == pytest.approx(counted, rel=1e-12)
        assert counted == 3 * forward_flops(model.config, source, target)


def test_dataset_has_the_reference_length_spread(tmp_path: Path) -> None:
    path = build_dataset(EXAMPLE_DATA, tmp_path / "bench.json", records=400)
    again = build_dataset(EXAMPLE_DATA, tmp_path / "again.json", records=400)
    records = json.loads(path.read_text())
    assert records == json.loads(again.read_text())  # deterministic
    assert len(records) == 400
    assert max(len(r["question"].split()) for r in records) == 514
    assert max(len(r["reply"].split()) for r in records) == 111
    # in tokens of the benchmark's tokenizer: the reference's spread (99 / 165 / ~512; 53)
    tokenizer = train_tokenizer(training_texts(path), TOKENIZER_VOCABULARY)
    questions = [len(tokenizer(r["question"]).input_ids) for r in records]
    answers = [len(tokenizer(r["reply"]).input_ids) for r in records]
    assert 90 <= np.median(questions) <= 108 and 150 <= np.mean(questions) <= 180
    assert 480 <= np.percentile(questions, 95) <= 580
    assert 48 <= np.median(answers) <= 58


@pytest.mark.parametrize("family", [None, "llama"])
def test_quick_benchmark_runs_and_writes_its_figures(tmp_path: Path, family: str | None) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.benchmark", "--quick", "--records", "40",
         "--workdir", str(tmp_path / "work"), "--out", str(out),
         *(["--family", family] if family else [])],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["model"] == ("llama, tiny" if family else "tiny")
    assert figures["train_examples"] == 38 and figures["steps"] == 5
    # 1 validation and 1 hold-out question, each answered by the fine-tune and by the base model
    assert figures["generated_answers"] == 4 and figures["generated_tokens"] > 0
    assert 0 < figures["matmul_share"] < 1.5 and figures["peak_rss_gb"] > 0
    bands = figures["steps_by_input_length"]
    assert sum(band["steps"] for band in bands) == figures["steps"]
    assert all(band["padded_gflops"] > 0 for band in bands if band["steps"])
    assert sum(band["seconds"] for band in bands) <= figures["train_seconds"]
    assert all(band["parts"] >= band["steps"] for band in bands)
    assert {"training", "evaluation", "tokenization"} <= set(figures["stage_seconds"])
    nodes = figures["node_seconds"]
    assert {"fitted_weights", "finetuned_answers", "base_answers"} <= set(nodes)
    assert nodes["fitted_weights"] <= figures["stage_seconds"]["training"]
    assert sum(nodes.values()) == pytest.approx(sum(figures["stage_seconds"].values()))
    machine = figures["cpu"]
    assert machine["cores"] == os.cpu_count() and machine["bf16_products"] in (True, False)
    assert machine["torch_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert figures["machine"].endswith(
        f"{os.cpu_count()} cores, torch's kernels {machine['torch_kernels']}, bf16 products "
        + ("native" if machine["bf16_products"] else "not native")
    )
    if Path("/proc/cpuinfo").is_file():  # Linux: the CPU's name, vendor, family and model
        assert all(machine[key] for key in ("name", "vendor", "family", "model"))
        assert f"family {machine['family']}, model {machine['model']}" in figures["machine"]
    assert figures["machine"] in done.stdout
    assert "train samples/s" in done.stdout
    # MKL's AVX-512 kernels, where this processor qualifies for them (a process of its own)
    assert figures["mkl_avx512"] is (mkl_kernels.refusal() is None)


def test_a_step_in_parts_is_banded_by_its_longest_part_and_counts_every_parts_work() -> None:
    config = T5Config(d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1, vocab_size=10)
    steps = [([(4, 100, 9)], 1.0), ([(2, 300, 9), (2, 500, 7)], 3.0), ([(8, 20, 5)], 0.5)]
    bands = {band["input_tokens"]: band for band in step_bands(steps, config)}
    assert [band["steps"] for band in bands.values()] == [2, 0, 0, 1]
    assert [band["parts"] for band in bands.values()] == [2, 0, 0, 2]
    assert bands[">384"]["seconds"] == 3.0
    work = 2 * 2 * (forward_flops(config, 300, 9) + forward_flops(config, 500, 7))
    assert bands[">384"]["padded_gflops"] == pytest.approx(work / 3.0 / 1e9)
    work = 2 * (4 * forward_flops(config, 100, 9) + 8 * forward_flops(config, 20, 5))
    assert bands["1-128"]["padded_gflops"] == pytest.approx(work / 1.5 / 1e9)


def _dataflow_sets(data: Path, model_dir: Path, config: dict[str, str]) -> dict[str, Any]:
    """The dataflow's tokenized sets and length caps for the data and model (`config`: the
    driver's, besides starting from the base model)."""
    dr = driver.Builder().with_config({"start": "base", **config}).with_modules(*MODULES).build()
    names = ["tokenized_train", "tokenized_validation", "tokenized_hold_out",
             "source_length_cap", "target_length_cap"]  # fmt: skip
    return dr.execute(
        names,
        inputs={"data_path": str(data), "model_id": str(model_dir),
                "input_text_key": "question", "output_text_key": "reply"},
    )  # fmt: skip


def test_peer_trains_and_answers_on_the_dataflows_sets(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = build_dataset(EXAMPLE_DATA, tmp_path / "bench.json", records=60)
    ours = _dataflow_sets(data, tiny_model_dir, {})
    records = json.loads(data.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sets, source_cap, target_cap = tokenized_sets(records, tokenizer)
    assert (source_cap, target_cap) == (ours["source_length_cap"], ours["target_length_cap"])
    for name in ("train", "validation", "hold_out"):
        peer = [{"input_ids": x["input_ids"], "labels": x["labels"]} for x in sets[name]]
        assert peer == list(ours[f"tokenized_{name}"]), name
    # both caps cut some texts: the truncation is compared too
    longest_question = max(map(len, tokenizer([r["question"] for r in records]).input_ids))
    longest_reply = max(map(len, tokenizer(text_target=[r["reply"] for r in records]).input_ids))
    assert source_cap < longest_question and target_cap < longest_reply


def test_decoder_only_peer_trains_on_the_dataflows_examples(
    tmp_path: Path, family_model: Callable[[str], Path]
) -> None:
    """`bench.peer_causal`'s examples are the prompt and the reply (with its end token)
    joined, labelled on the reply: the dataflow's examples as its collator joins them, cut
    alike (a long question keeps its first token and its end, a long reply its end token)."""
    model_dir = family_model("llama")
    data = build_dataset(EXAMPLE_DATA, tmp_path / "bench.json", records=60)
    ours = _dataflow_sets(data, model_dir, {"model_type": "causal"})
    records = json.loads(data.read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sets, source_cap, target_cap = causal_tokenized_sets(records, tokenizer)
    assert (source_cap, target_cap) == (ours["source_length_cap"], ours["target_length_cap"])
    for name in ("train", "validation", "hold_out"):
        expected = [
            {
                "input_ids": [*x["input_ids"], *x["labels"]],
                "labels": [-100] * len(x["input_ids"]) + list(x["labels"]),
            }
            for x in ours[f"tokenized_{name}"]
        ]
        peer = [{"input_ids": x["input_ids"], "labels": x["labels"]} for x in sets[name]]
        assert peer == expected, name
        assert all(x["attention_mask"] == [1] * len(x["input_ids"]) for x in sets[name])
    # both caps cut some texts, the question in its middle and the reply before its end token
    questions = [x for x in ours["tokenized_train"] if len(x["input_ids"]) == source_cap]
    replies = [x for x in ours["tokenized_train"] if len(x["labels"]) == target_cap]
    longest_question = max(map(len, tokenizer([r["question"] for r in records]).input_ids))
    longest_reply = max(
        map(len, tokenizer([r["reply"] for r in records], add_special_tokens=False).input_ids)
    )
    assert source_cap < longest_question and target_cap <= longest_reply
    assert questions and replies
    assert {x["input_ids"][0] for x in questions} == {tokenizer.bos_token_id}
    assert {x["labels"][-1] for x in replies} == {tokenizer.eos_token_id}


@pytest.mark.parametrize(
    "flushed",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # True imports the peer's libraries
)
def test_peer_can_flush_subnormal_floats_on_every_thread(flushed: bool) -> None:
    """`bench.peer --flush-subnormals` (in a process of its own: the setting is the threads'):
    a product of subnormal floats on two threads is zero in every row once they are flushed,
    and not without."""
    script = (
        "import torch\n"
        + (
            "from bench.peer import flush_subnormals\nassert flush_subnormals()\n"
            if flushed
            else ""
        )
        + "torch.set_num_threads(2)\n"
        "product = torch.full((64, 64), 1e-39) @ torch.ones(64, 64)\n"
        "print(int((product != 0).any(dim=1).sum()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == (0 if flushed else 64)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "bf16"), [(None, False), ("llama", False), (None, True)])
def test_quick_comparison_runs_both_and_writes_every_figure(
    tmp_path: Path, family: str | None, bf16: bool
) -> None:
    out = tmp_path / "comparison.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--quick",
         "--workdir", str(tmp_path / "work"), "--out", str(out),
         *(["--family", family] if family else []), *(["--bf16"] if bf16 else [])],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    comparison = json.loads(out.read_text())
    assert comparison["family"] == family
    # both sides trained in the precision asked (the comparison refuses sides that differ)
    precision = "bf16 autocast" if bf16 else "fp32"
    assert comparison["precision"] == precision
    assert comparison["peer_figures"]["precision"] == comparison["us_figures"]["precision"]
    assert f"{precision} on both sides" in done.stdout
    assert comparison["model"] == ("llama, tiny" if family else "tiny")
    figures = {"whole_seconds", "train_seconds", "generation_seconds", "peak_rss_gb"}
    for side in ("peer", "us", "peer_over_us"):
        assert set(comparison[side]) == figures
        assert all(value > 0 for value in comparison[side].values()), side
    for figure in figures:
        ratio = comparison["peer"][figure] / comparison["us"][figure]
        assert comparison["peer_over_us"][figure] == pytest.approx(ratio)
    # the plain script, as written
    assert comparison["peer_flush_subnormals"] is False and comparison["peer_mkl_avx512"] is False
    peer = comparison["peer_figures"]
    # 24 records: 22 to train on (3 steps of 8), 1 validation and 1 hold-out question
    assert peer["train_examples"] == 22 and peer["steps"] == 3
    assert peer["generated_answers"] == 2 and peer["generated_tokens"] > 0
    assert [len(peer["answers"][name]) for name in ("validation", "hold_out")] == [1, 1]
    for side in ("peer", "us"):
        for name in ("validation", "hold_out"):
            assert set(comparison["rouge"][side][name]) == set(ROUGE_KEYS)
    assert comparison["generated_tokens"]["us"] > 0 and comparison["our_base_answers_seconds"] > 0
    assert comparison["validation_loss"]["peer"] > 0 and comparison["validation_loss"]["us"] > 0
    adapter = json.loads(
        (tmp_path / "work" / "peer-run" / "adapter" / "adapter_config.json").read_text()
    )
    # the peer trained the same kind of model: the decoder-only script for a family
    assert adapter["task_type"] == ("CAUSAL_LM" if family else "SEQ_2_SEQ_LM")
    assert "peer / us" in done.stdout and "whole job" in done.stdout


def _fake_sides(monkeypatch: pytest.MonkeyPatch, whole: dict[str, list[float]]) -> list[str]:
    """`bench.compare` with its two sides replaced: each run of a side writes the figures a
    real one would, its whole job's seconds the next of `whole[side]`; returns the sides in
    the order they ran."""
    ran: list[str] = []
    rouge = {key: 0.5 for key in ROUGE_KEYS}
    shared = {"train_examples": 22, "steps": 3, "source_length_cap": 40, "target_length_cap": 9}

    def run(module: str, arguments: list[str]) -> None:
        side = "us" if module == "bench.benchmark" else "peer"
        seconds = whole[side][sum(s == side for s in ran)]
        ran.append(side)
        precision = "bf16 autocast" if "--bf16" in arguments else "fp32"
        if side == "peer":
            figures = {**shared, "precision": precision,
                       "whole_seconds": seconds, "train_seconds": seconds - 5,
                       "generation_seconds": 4.0, "peak_rss_gb": 5.0, "generated_answers": 2,
                       "flush_subnormals": False, "mkl_avx512": "--mkl-avx512" in arguments,
                       "generated_tokens": 18, "best_eval_loss": 3.0,
                       "rouge": {"validation": rouge, "hold_out": rouge}}  # fmt: skip
        else:
            figures = {**shared, "precision": precision,
                       "dag_seconds": seconds, "train_seconds": seconds - 5,
                       "finetuned_answers_seconds": 1.0, "peak_rss_gb": 2.0,
                       "finetuned_generated_answers": 2, "model": "tiny",
                       "finetuned_generated_tokens": 18, "base_answers_seconds": 1.0,
                       "eval_loss": 3.0, "rouge": rouge, "hold_out_rouge": rouge,
                       "machine": "a CPU, 2 cores"}  # fmt: skip
        out = Path(arguments[arguments.index("--out") + 1])
        out.write_text(json.dumps(figures), encoding="utf-8")

    monkeypatch.setattr(compare, "prepare", lambda work, *args: (work / "d", work / "m"))
    monkeypatch.setattr(compare, "_run", run)
    return ran


def test_comparison_rounds_alternate_the_sides_and_give_the_median_of_their_ratios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = _fake_sides(monkeypatch, {"peer": [200.0, 180.0, 230.0], "us": [90.0, 100.0, 120.0]})
    summary = compare.compare_rounds(tmp_path, 3)
    assert ran == ["peer", "us", "us", "peer", "peer", "us"]
    assert [r["us_first"] for r in summary["rounds"]] == [False, True, False]
    # each side's median, and the median of the rounds' ratios (2.22, 1.80, 1.92), which is
    # not the ratio of the medians (200 / 100)
    assert summary["peer"]["whole_seconds"] == 200.0 and summary["us"]["whole_seconds"] == 100.0
    assert summary["peer_over_us"]["whole_seconds"] == pytest.approx(230.0 / 120.0)
    assert [r["peer_over_us"]["whole_seconds"] for r in summary["rounds"]] == pytest.approx(
        [200 / 90, 180 / 100, 230 / 120]
    )
    text = compare.table(summary)
    assert "medians of 3 rounds" in text and "whole job: 2.22x, 1.80x, 1.92x" in text
    assert "machine: a CPU, 2 cores" in text
    # one round is the comparison as it was, and no rounds is refused
    ran.clear()
    single = compare.compare_rounds(tmp_path, 1)
    assert "rounds" not in single and "medians of" not in compare.table(single)
    assert single["peer_over_us"]["whole_seconds"] == pytest.approx(200.0 / 90.0)
    assert single["peer_mkl_avx512"] is False
    # the peer given MKL's AVX-512 kernels, as ours takes them: said so in the table
    ran.clear()
    given = compare.compare_rounds(tmp_path, 1, peer_mkl_avx512=True)
    assert given["peer_mkl_avx512"] is True
    assert "the peer took MKL's AVX-512 kernels" in compare.table(given)
    with pytest.raises(ValueError, match="at least 1"):
        compare.compare_rounds(tmp_path, 0)


@pytest.mark.parametrize(
    "family",
    [
        pytest.param([], id="t5"),
        pytest.param(["--family", "llama"], id="llama", marks=pytest.mark.slow),
        pytest.param(["--padding-ends"], id="t5-padding-ends", marks=pytest.mark.slow),
        pytest.param(["--num-beams", "2"], id="t5-beams", marks=pytest.mark.slow),
    ],
)
def test_quick_decoding_benchmark_runs_and_writes_its_figures(
    family: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "decoding.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.decoding", "--quick", "--records", "40", "--threads", "1",
         *family, "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    # 1 validation and 1 hold-out question; every run decodes to the cap (8) or an end before
    # (a decoder-only model's first token comes with reading its prompts)
    assert figures["answers"] == 2 and 0 < figures["decode_steps"] <= 8
    assert figures["weight_mb_per_step"] > 0 and figures["memory_bandwidth_gb_s"] > 0
    measured = figures["by_threads"]["1"]
    assert measured["speedup"] > 0 and set(measured["seconds_per_step"]) == {"stock", "lean"}
    assert "stock / lean" in done.stdout
    assert figures["padding_ends"] == ("--padding-ends" in family)
    assert figures["num_beams"] == (2 if "--num-beams" in family else 1)


@pytest.mark.slow
def test_quick_step_profile_splits_a_steps_time_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.step_profile", "--quick", "--threads", "1",
         "--warmup", "1", "--steps", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["threads"] == 1 and figures["steps"] == 2
    assert figures["step_seconds"] > 0 and figures["matmul_seconds"] > 0
    # T5's matmuls do real work at a real rate, and take part (not all) of the step
    assert figures["matmul_gflop"] > 0 and 0 < figures["matmul_gflops"] < 10_000
    assert 0 < figures["matmul_time_share"] < 1
    assert figures["step_seconds_matmuls_only"] < figures["step_seconds"]
    assert any(op.startswith("aten::") for op in figures["other_ops"])
    assert {row["op"].split()[0] for row in figures["matmul_shapes"]} <= MATMULS
    assert not MATMULS & set(figures["other_ops"])
    assert "matmul share of CPU time" in done.stdout
    # the page faults and system time of the timed and the profiled steps, each within the
    # CPU time the process could have spent in them
    for prefix, step in (("", "step_seconds"), ("profiled_", "profiled_step_seconds")):
        assert figures[f"{prefix}page_faults_per_step"] >= 0
        assert 0 <= figures[f"{prefix}system_seconds_per_step"] <= figures[step] * os.cpu_count()
    assert "page faults a step" in done.stdout
