"""Time greedy decoding (or beam search): Hugging Face `generate` against the lean loop, side
by side in one process, and both against the bound of streaming the weights once per decode
step.

    python -m bench.decoding                  # flan-t5-small's shape: 20 answers, cap 118
    python -m bench.decoding --quick          # a tiny model: checks the script itself runs
    python -m bench.decoding --threads 2,1    # the comparison under each torch thread count
    python -m bench.decoding --family llama   # a decoder-only model of the same width
    python -m bench.decoding --num-beams 4    # beam search: generate's against the lean search

The model, data and questions are the benchmark's (`bench.benchmark`): its fine-tune as the
evaluation stage holds it (the recipe's model with a fresh LoRA adapter), answering the
validation and hold-out questions with `generation.generate`, batch 32, greedy (`--num-beams`:
beam search, `beam_search.beam_generate` against `generate`'s), to the cap.
`--family` takes a decoder-only family of `finetune_module.tiny_model` instead, built with
flan-t5-small's width and depth (d_model 512, 8 layers, 8 heads, d_ff 1024) and the
benchmark's tokenizer vocabulary: its prompts (the questions in the prompt template, padded
on the left) are read once, then each step reads them again from the cache.
Rounds alternate the order (stock then lean, lean then stock, ...) and the figures are the
median of the per-round ratios: the machine is shared, and only ratios measured side by side
mean much. Both paths must give the same answers (the script stops if they do not).

A decode step is one call of the decoder that chooses one token a sequence; reading the
questions (the encoder's pass, or a decoder-only model's first pass over its prompts) is
timed apart. The
bound of a step is the bytes of weights it reads (every module that runs in a step, less the
embedding tables, which are read a row per token; the cross-attention keys and values are
computed once per batch) over the memory bandwidth measured here (the best of a few sums of
a large tensor); the bound of the run is that times the number of steps. A second bound adds
the key/value caches each step reads (the encoder states' keys and values, or a decoder-only
model's prompts', padded to the longest question of each length group that the steps attend
in, and the answers' own). A third is the step's matmul work (2 FLOPs
per weight per row of the batch) at the machine's matmul peak (`bench.benchmark`'s, measured
on large square matrices).
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hamilton import driver

import finetune_module
from bench.benchmark import aligned, bench_parser, decoder_model, matmul_gflops, prepare, shown
from finetune_module.engine import generation
from finetune_module.engine.decoding import greedy_generate, greedy_rules, transformers_model
from finetune_module.engine.models import build_model
from finetune_module.engine.tokens import length_groups
from finetune_module.tiny_model import FAMILIES

CAP = 118  # the new-token cap of the answers (the benchmark run's target length cap)


def benchmark_questions(data_path: Path, model_dir: Path, kind: str) -> dict[str, Any]:
    """The benchmark run's evaluation work, from the dataflow (a model of `kind`, "seq2seq"
    or "causal"): its `tokenizer`, its `model_recipe` and its validation and hold-out
    questions (`examples`, tokenized)."""
    config = {"start": "base", "model_type": kind}
    dr = driver.Builder().with_config(config).with_modules(*finetune_module.MODULES)
    inputs = {
        "data_path": str(data_path),
        "input_text_key": "question",
        "output_text_key": "reply",
        "model_id": str(model_dir),
        "quiet": True,
    }
    nodes = ["tokenizer", "model_recipe", "tokenized_validation", "tokenized_hold_out"]
    found = dr.build().execute(nodes, inputs=inputs)
    examples = [*found["tokenized_validation"], *found["tokenized_hold_out"]]
    return {"tokenizer": found["tokenizer"], "recipe": found["model_recipe"], "examples": examples}


def memory_bandwidth(megabytes: int = 512, trials: int = 5) -> float:
    """The machine's memory bandwidth in GB/s: the best of a few sums of a large float32
    tensor (read once each)."""
    values = torch.ones(megabytes * 2**20 // 4)
    values.sum()
    best = min(_seconds(values.sum) for _ in range(trials))
    return values.numel() * 4 / best / 1e9


def _seconds(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def weight_bytes_per_step(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """The bytes of weights one decode step reads: the parameters of every module that runs
    in the second step of decoding `input_ids` (after the first step's output layer, up to
    its own: cross-attention keys and values come from the cache by then; or in the first
    step, after the encoder's pass, where every answer ends there), less the embedding
    tables, which are read a row per token. (T5's written steps apply its norms' weights
    without calling their modules: 6 KB a layer left out.)"""
    ran: list[torch.nn.Module] = []
    step: list[torch.nn.Module] = []  # the modules of the last step (up to its output layer)

    def step_done(*_: Any) -> None:
        step[:] = ran
        ran.clear()

    net = transformers_model(model)
    hooks = [m.register_forward_hook(lambda m, *_: ran.append(m)) for m in net.modules()]
    hooks += [net.get_output_embeddings().register_forward_hook(step_done)]
    if net.config.is_encoder_decoder:  # a step starts after the encoder's pass
        hooks += [net.get_encoder().register_forward_hook(lambda *_: ran.clear())]
    try:
        with torch.inference_mode():
            greedy_generate(model, input_ids, torch.ones_like(input_ids), 2, None)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(
        p.numel() * p.element_size()
        for m in set(step)
        if not isinstance(m, torch.nn.Embedding)
        for p in m.parameters(recurse=False)
    )


def cache_bytes_per_step(
    config: Any, batches: list[list[int]], steps: list[int], beams: int = 1
) -> float:
    """The mean bytes of keys and values a decode step of a T5 or a Llama-shaped model reads:
    per batch of question (or prompt) lengths, the questions (a T5's encoder states, a
    decoder-only model's prompt) each padded to the longest of its length group
    (`tokens.length_groups`, the groups the steps attend in) and, on average, half the
    answers' length, over the steps each batch ran (float32). With `beams` (beam search),
    every answer is that many rows, and so is a decoder-only model's prompt (a T5's written
    steps read each question's once for all its beams)."""
    if config.is_encoder_decoder:
        layers, width = config.num_decoder_layers, config.num_heads * config.d_kv
    else:
        layers = config.num_hidden_layers
        width = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    per_token = 2 * layers * width * 4
    read = 0.0
    for lengths, n in zip(batches, steps, strict=True):
        groups = length_groups(lengths)
        keys = sum(len(rows) * max(lengths[row] for row in rows) for rows in groups)
        questions = keys * (1 if config.is_encoder_decoder else beams)
        read += (questions + beams * len(lengths) * n / 2) * per_token * n
    return read / max(1, sum(steps))


@contextlib.contextmanager
def counted(model: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """While the block runs: the decode steps (`steps`, per batch in `batch_steps`) and the
    seconds of reading the questions (`input_seconds`): an encoder's pass, or a decoder-only
    model's pass over the prompts (its call on an empty cache, not counted as a step)."""
    net = transformers_model(model)
    counts: dict[str, Any] = {"steps": 0, "batch_steps": [], "input_seconds": 0.0}
    started: list[float] = []

    def reads_prompts(kwargs: dict[str, Any]) -> bool:
        return not net.config.is_encoder_decoder and not kwargs["past_key_values"].get_seq_length()

    new_batch = [False]  # questions were read since the last decode step

    def input_started(*_: Any) -> None:
        started.append(time.perf_counter())
        new_batch[0] = True

    def input_done(*_: Any) -> None:
        counts["input_seconds"] += time.perf_counter() - started.pop()

    def decoder_called(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if reads_prompts(kwargs):
            input_started()
            return
        step_called()

    def step_called(*_: Any) -> None:
        if new_batch[0]:  # the first step of a batch (an encoder may read it in groups)
            counts["batch_steps"].append(0)
            new_batch[0] = False
        counts["steps"] += 1
        counts["batch_steps"][-1] += 1

    def decoder_done(_: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if started:
            input_done()

    if net.config.is_encoder_decoder:
        # a step ends in the output layer, whether the decoder runs as the model's forward
        # pass or as written steps (T5's, `t5_steps`)
        reader = net.get_encoder()
        hooks = [
            net.get_output_embeddings().register_forward_pre_hook(step_called),
            reader.register_forward_pre_hook(input_started),
            reader.register_forward_hook(input_done),
        ]
    else:
        decoder = net.get_decoder()
        hooks = [
            decoder.register_forward_pre_hook(decoder_called, with_kwargs=True),
            decoder.register_forward_hook(decoder_done, with_kwargs=True),
        ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def timed_answers(
    model: torch.nn.Module, work: dict[str, Any], settings: dict[str, int], lean: bool
) -> dict[str, Any]:
    """One pass of `generation.generate` over the questions: its `answers`, `seconds`,
    decode `steps` (and per batch), and the seconds of reading the questions."""
    with counted(model) as counts:
        started = time.perf_counter()
        answers = generation.generate(
            model, work["tokenizer"], work["examples"], **settings, lean=lean
        )
        counts["seconds"] = time.perf_counter() - started
    return {**counts, "answers": answers}


def compare(
    model: torch.nn.Module, work: dict[str, Any], settings: dict[str, int], rounds: int
) -> dict[str, Any]:
    """`rounds` interleaved passes of each path (the order alternating): the runs, and the
    median per-round ratios of stock to lean seconds (whole, and decoding only)."""
    runs: dict[str, list[dict[str, Any]]] = {"stock": [], "lean": []}
    for round_ in range(rounds):
        for path in ("stock", "lean") if round_ % 2 == 0 else ("lean", "stock"):
            runs[path].append(timed_answers(model, work, settings, lean=path == "lean"))
    answers = {run["answers"] == runs["stock"][0]["answers"] for run in runs["lean"]}
    if answers != {True}:
        raise SystemExit("The lean loop's answers differ from generate's.")

    def decode_seconds(run: dict[str, Any]) -> float:
        return run["seconds"] - run["input_seconds"]

    pairs = list(zip(runs["stock"], runs["lean"], strict=True))
    return {
        "runs": runs,
        "speedup": statistics.median(s["seconds"] / n["seconds"] for s, n in pairs),
        "decode_speedup": statistics.median(
            decode_seconds(s) / decode_seconds(n) for s, n in pairs
        ),
        "seconds_per_step": {
            path: statistics.median(decode_seconds(run) / run["steps"] for run in runs[path])
            for path in runs
        },
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the model and questions and measures; returns the figures."""
    work_dir = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-bench-"))
    data_path, model_dir = prepare(work_dir, args.quick, args.records)
    kind = "seq2seq"
    if args.family:
        model_dir, kind = decoder_model(work_dir, data_path, args.family, args.quick), "causal"
    work = benchmark_questions(data_path, model_dir, kind)
    model = build_model(work["recipe"], torch.device("cpu"))
    beams = args.num_beams
    settings = {"max_new_tokens": args.max_new_tokens, "num_beams": beams, "batch_size": args.batch}
    if not generation.uses_lean_decoding(model, num_beams=beams):
        raise SystemExit("The lean loop does not apply to this model.")
    if args.padding_ends:  # answers that end at different steps (see --padding-ends)
        config = transformers_model(model).generation_config
        ends = greedy_rules(config, None).eos_token_ids
        config.eos_token_id = [*ends, work["tokenizer"].pad_token_id]

    bandwidth, peak_gflops = memory_bandwidth(), matmul_gflops()
    weights = weight_bytes_per_step(model, torch.tensor([work["examples"][0]["input_ids"]]))
    by_threads = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        by_threads[threads] = compare(model, work, settings, args.rounds)
    first = by_threads[args.threads[0]]["runs"]["lean"][0]
    lengths = sorted(len(x["input_ids"]) for x in work["examples"])
    batches = [lengths[i : i + args.batch] for i in range(0, len(lengths), args.batch)]
    config = transformers_model(model).config
    caches = cache_bytes_per_step(config, batches, first["batch_steps"], beams)
    rows = beams * sum(len(b) * n for b, n in zip(batches, first["batch_steps"], strict=True))
    flops = 2 * weights / 4 * rows / first["steps"]  # float32 weights, mean rows a step
    return {
        "model": args.family or ("tiny" if args.quick else "flan-t5-small shape"),
        "padding_ends": args.padding_ends,
        "answers": len(work["examples"]),
        **settings,
        "decode_steps": first["steps"],
        "memory_bandwidth_gb_s": bandwidth,
        "weight_mb_per_step": weights / 1e6,
        "cache_mb_per_step": caches / 1e6,
        "bound_seconds_per_step": weights / (bandwidth * 1e9),
        "bound_with_caches_seconds_per_step": (weights + caches) / (bandwidth * 1e9),
        "matmul_peak_gflops": peak_gflops,
        "compute_bound_seconds_per_step": flops / (peak_gflops * 1e9),
        "by_threads": {
            threads: {
                "speedup": found["speedup"],
                "decode_speedup": found["decode_speedup"],
                "seconds_per_step": found["seconds_per_step"],
                "seconds": {p: [r["seconds"] for r in runs] for p, runs in found["runs"].items()},
                "input_seconds": {
                    p: [r["input_seconds"] for r in runs] for p, runs in found["runs"].items()
                },
            }
            for threads, found in by_threads.items()
        },
    }


def _table(f: dict[str, Any]) -> str:
    """The figures as a short text table."""
    bound = f["bound_seconds_per_step"]
    rows = [
        ("model", f["model"] + (", padding ends answers" if f["padding_ends"] else "")),
        (
            "answers x cap, batch",
            f"{f['answers']} x {f['max_new_tokens']}, {f['batch_size']}"
            + (f", {f['num_beams']} beams" if f["num_beams"] > 1 else ", greedy"),
        ),
        ("decode steps", f"{f['decode_steps']}"),
        ("memory bandwidth", f"{f['memory_bandwidth_gb_s']:.1f} GB/s"),
        ("weights read per step", f"{f['weight_mb_per_step']:.1f} MB"),
        ("caches read per step", f"{f['cache_mb_per_step']:.1f} MB (mean)"),
        ("bound per step", f"{1e3 * bound:.2f} ms (weights only)"),
        ("", f"{1e3 * f['bound_with_caches_seconds_per_step']:.2f} ms (with caches)"),
        (
            "",
            f"{1e3 * f['compute_bound_seconds_per_step']:.2f} ms (matmuls at the "
            f"{f['matmul_peak_gflops']:.0f} GFLOP/s peak)",
        ),
        ("bound, whole run", f"{bound * f['decode_steps']:.2f} s"),
    ]
    for threads, t in f["by_threads"].items():
        stock, lean = t["seconds_per_step"]["stock"], t["seconds_per_step"]["lean"]
        rows += [
            (f"{threads} thread(s): s/step", f"stock {stock:.4f}, lean {lean:.4f}"),
            ("  x the bound", f"stock {stock / bound:.1f}, lean {lean / bound:.1f}"),
            (
                "  stock / lean (median)",
                f"{t['speedup']:.2f}x whole, {t['decode_speedup']:.2f}x decoding",
            ),
        ]
    return aligned(rows)


def main(argv: list[str] | None = None) -> int:
    """Command line of the decoding benchmark."""
    p = bench_parser(
        "bench.decoding",
        __doc__.split("\n\n")[0],
        60,
        "a tiny model, a short cap, 2 rounds",
        "decoding.json",
    )
    p.add_argument("--max-new-tokens", type=int, help=f"the cap (default: {CAP}, --quick: 8)")
    p.add_argument("--batch", type=int, default=32, help="default: %(default)s")
    p.add_argument(
        "--family",
        choices=[name for name, family in FAMILIES.items() if family.kind == "causal"],
        help="a decoder-only model of this family, of flan-t5-small's width, instead",
    )
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams (default: %(default)s, greedy)",
    )
    p.add_argument("--rounds", type=int, help="passes of each path (default: 4, --quick: 2)")
    p.add_argument(
        "--padding-ends",
        action="store_true",
        help="the padding token ends an answer too: the benchmark model (random weights) "
        "answers most questions with padding alone, so its answers then end at different "
        "steps, as a trained model's do",
    )
    p.add_argument(
        "--threads",
        default=str(torch.get_num_threads()),
        help="comma-separated torch thread counts to measure under (default: %(default)s)",
    )
    args = p.parse_args(argv)
    args.records = args.records or (60 if args.quick else 400)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else CAP)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.threads = [int(n) for n in args.threads.split(",")]
    figures = measure(args)
    shown(_table(figures), figures, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
