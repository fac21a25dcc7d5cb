"""The headline benchmark: the plain Hugging Face script a user would write (`bench/peer.py`)
and our dataflow, side by side on the same data and model.

    python -m bench.compare                      # flan-t5-small's shape, 400 records, 1 epoch
    python -m bench.compare --quick              # a tiny model: checks the comparison runs
    python -m bench.compare --family llama       # a decoder-only model of the same size
    python -m bench.compare --rounds 3           # three rounds: each side's median, each ratio
    python -m bench.compare --bf16               # both sides in bf16 mixed precision

The benchmark's model and dataset are built once (`bench.benchmark.prepare`), then the peer
(`bench.peer`; with `--family`, a decoder-only model and `bench.peer_causal`) and our dataflow
(`bench.benchmark`, every lever on) run back to back, each in its own process so that each
peak memory is its own, with the same epochs and batch size. For each figure the
table gives the peer's value, ours, and the ratio peer / us: above 1, we are faster (or take
less memory).

- whole job: from reading the data to the saved model, after the imports (the peer's
  `whole_seconds`, our DAG's `dag_seconds`); ours also answers with the base model, computes
  the validation loss again and writes the report.
- training: the Trainer's `train_runtime` on both sides (evaluation each epoch included).
- generation: the fine-tuned model's greedy answers to the validation and hold-out questions,
  up to the target cap: the peer's two `trainer.predict` calls (each also computes a loss; the
  decoder-only peer's `model.generate` in batches), our `finetuned_answers` node.
- peak memory: each process's peak resident set.

On a shared machine either side's time varies by several percent from one run to the next,
and not with the other's, so one run's ratio can be off by as much. `--rounds N` runs both
sides N times, alternating which goes first (the peer in the first round, ours in the second,
...), and gives each figure's median over the rounds on each side, the median of the rounds'
ratios, and every round's figures (`rounds`).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.benchmark import DECODER_FAMILIES, REPO, bench_parser, prepare

# what is compared: (label, the peer's figure, our figure, unit)
FIGURES = (
    ("whole job", "whole_seconds", "dag_seconds", "s"),
    ("training", "train_seconds", "train_seconds", "s"),
    ("generation", "generation_seconds", "finetuned_answers_seconds", "s"),
    ("peak memory", "peak_rss_gb", "peak_rss_gb", "GiB"),  # ru_maxrss / 2**20
)
# what both sides must share for the comparison to be fair: (the peer's figure, our figure)
SHARED = (
    ("train_examples", "train_examples"),
    ("steps", "steps"),
    ("source_length_cap", "source_length_cap"),
    ("target_length_cap", "target_length_cap"),
    ("generated_answers", "finetuned_generated_answers"),
    ("precision", "precision"),
)


def _run(module: str, arguments: list[str]) -> None:
    """Runs `python -m module arguments` in its own process, offline, from the repository."""
    command = [sys.executable, "-m", module, *arguments]
    subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)


def _load_average() -> float:
    """The machine's load average over the last minute (runnable processes)."""
    return os.getloadavg()[0]


def compare(
    work: Path,
    quick: bool = False,
    records: int = 400,
    epochs: float = 1.0,
    batch_size: int = 8,
    max_new_tokens: int = 0,
    peer_flush_subnormals: bool = False,
    peer_mkl_avx512: bool = False,
    family: str | None = None,
    bf16: bool = False,
    us_first: bool = False,
) -> dict[str, Any]:
    """Runs the peer and our dataflow back to back on the benchmark's model and data (built in
    `work` unless already there) and returns the comparison: each side's figures by the
    peer's names (`peer`, `us`), the ratios peer / us (`peer_over_us`), the scores, the load
    of the machine before and after, and each side's full figures (`peer_figures`,
    `us_figures`).

    :param quick: a tiny model instead of flan-t5-small's shape.
    :param records: the dataset's size.
    :param epochs: training epochs, on both sides.
    :param batch_size: the training batch size, on both sides.
    :param max_new_tokens: the longest answer on both sides (0: the target cap).
    :param peer_flush_subnormals: the peer flushes subnormal floats to zero on every thread
        (`bench.peer --flush-subnormals`), which the plain script does not: our loss makes
        none, and on some CPUs the script's own loss makes them slow.
    :param peer_mkl_avx512: the peer takes MKL's AVX-512 kernels on an AMD processor with
        AVX-512 (`bench.peer --mkl-avx512`), as our dataflow does and the plain script does not.
    :param family: a decoder-only model of this family (`bench.benchmark.DECODER_FAMILIES`),
        and the decoder-only peer (`bench.peer_causal`), instead of the sequence-to-sequence
        ones.
    :param bf16: both sides train in bf16 mixed precision (the Trainer's `bf16`, ours `bf16`;
        on a CPU, fast where it multiplies bf16 natively).
    :param us_first: our dataflow runs first, then the peer.
    """
    data_path, model_dir = prepare(work, quick, records, family)
    common = ["--epochs", str(epochs), "--batch-size", str(batch_size)]
    common += ["--bf16"] if bf16 else []
    if max_new_tokens:
        common += ["--max-new-tokens", str(max_new_tokens)]
    load_before = _load_average()
    peer_out, us_out = work / "peer.json", work / "us.json"
    peer_run = work / "peer-run"
    options = ["--flush-subnormals"] if peer_flush_subnormals else []
    options += ["--mkl-avx512"] if peer_mkl_avx512 else []
    peer_script = "bench.peer_causal" if family else "bench.peer"
    ours = (["--quick"] if quick else []) + (["--family", family] if family else [])
    sides = [
        (peer_script, ["--data", str(data_path), "--model", str(model_dir),
                       "--output-dir", str(peer_run), "--out", str(peer_out), *common, *options]),
        ("bench.benchmark", ["--workdir", str(work), "--records", str(records),
                             "--out", str(us_out), *common, *ours]),
    ]  # fmt: skip
    for module, arguments in reversed(sides) if us_first else sides:
        _run(module, arguments)
    load_after = _load_average()
    peer = json.loads(peer_out.read_text(encoding="utf-8"))
    us = json.loads(us_out.read_text(encoding="utf-8"))
    differing = [f"{p} {peer[p]} vs {us[u]}" for p, u in SHARED if peer[p] != us[u]]
    if differing:
        raise RuntimeError(f"The peer and our dataflow did not do the same work: {differing}")
    return {
        "model": us["model"],
        "family": family,
        "records": records,
        "epochs": epochs,
        "batch_size": batch_size,
        "peer_flush_subnormals": peer["flush_subnormals"],
        "peer_mkl_avx512": peer["mkl_avx512"],
        "precision": us["precision"],
        "peer": {p: peer[p] for _, p, _, _ in FIGURES},
        "us": {p: us[u] for _, p, u, _ in FIGURES},
        "peer_over_us": {p: peer[p] / us[u] for _, p, u, _ in FIGURES},
        "generated_tokens": {
            "peer": peer["generated_tokens"],
            "us": us["finetuned_generated_tokens"],
        },
        "our_base_answers_seconds": us["base_answers_seconds"],
        "validation_loss": {"peer": peer["best_eval_loss"], "us": us["eval_loss"]},
        "rouge": {
            "peer": peer["rouge"],
            "us": {"validation": us["rouge"], "hold_out": us["hold_out_rouge"]},
        },
        "load_average": {"before": load_before, "after": load_after, "cores": os.cpu_count()},
        "us_first": us_first,
        "peer_figures": peer,
        "us_figures": us,
    }


def compare_rounds(work: Path, rounds: int, **settings: Any) -> dict[str, Any]:
    """`compare` run `rounds` times, our dataflow first in every second round; one round's
    comparison as it is, several summed up by `medians`."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    runs = [compare(work, **settings, us_first=index % 2 == 1) for index in range(rounds)]
    return runs[0] if rounds == 1 else medians(runs)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds' comparisons as one: each side's median of each figure (`peer`, `us`),
    the median of the rounds' ratios (`peer_over_us`, not the ratio of the medians: a round's
    ratio is of two runs made minutes apart), the load before the first round and after the
    last, and each round's figures, ratios, load and order (`rounds`); the rest (the model,
    the scores, each side's full figures) is the last round's."""
    last = runs[-1]
    by_side = {
        side: {name: statistics.median(run[side][name] for run in runs) for name in last[side]}
        for side in ("peer", "us", "peer_over_us")
    }
    load = {**last["load_average"], "before": runs[0]["load_average"]["before"]}
    kept = ("peer", "us", "peer_over_us", "load_average", "us_first")
    return {
        **last,
        **by_side,
        "load_average": load,
        "rounds": [{key: run[key] for key in kept} for run in runs],
    }


def _value(value: float, unit: str) -> str:
    """A figure with its unit."""
    return f"{value:.2f} {unit}" if unit == "GiB" else f"{value:.1f} {unit}"


def table(c: dict[str, Any]) -> str:
    """The comparison as a short text table, with the context below it."""
    rows = [("", "peer", "us", "peer / us")]
    rows += [
        (
            label,
            _value(c["peer"][p], unit),
            _value(c["us"][p], unit),
            f"{c['peer_over_us'][p]:.2f}x",
        )
        for label, p, _, unit in FIGURES
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [  # the labels on the left, the figures on the right
        "  ".join(
            [row[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        )
        for row in rows
    ]
    rounds = c.get("rounds", [])
    if rounds:
        lines += ["", f"medians of {len(rounds)} rounds; each round's peer / us, in order:"]
        lines += [
            f"  {label}: " + ", ".join(f"{run['peer_over_us'][p]:.2f}x" for run in rounds)
            for label, p, _, _ in FIGURES
        ]
    rouge, load = c["rouge"], c["load_average"]
    answers = c["us_figures"]["finetuned_generated_answers"]
    lines += [
        "",
        f"{c['model']}, {c['records']} records, {c['epochs']:g} epoch(s), batch {c['batch_size']}"
        + f", {c.get('precision', 'fp32')} on both sides"
        + ("; the peer flushed subnormal floats to zero" if c["peer_flush_subnormals"] else "")
        + ("; the peer took MKL's AVX-512 kernels" if c.get("peer_mkl_avx512") else ""),
        f"answers: {answers:.0f} on each side, {c['generated_tokens']['peer']:.0f} tokens (peer) "
        f"vs {c['generated_tokens']['us']:.0f} (us); ours also answers with the base model "
        f"({c['our_base_answers_seconds']:.1f} s, within our whole job)",
        f"validation loss: {c['validation_loss']['peer']:.4f} (peer) vs "
        f"{c['validation_loss']['us']:.4f} (us)",
        f"ROUGE-L validation / hold-out: {rouge['peer']['validation']['rougeL']:.2f} / "
        f"{rouge['peer']['hold_out']['rougeL']:.2f} (peer) vs "
        f"{rouge['us']['validation']['rougeL']:.2f} / {rouge['us']['hold_out']['rougeL']:.2f} (us)",
        f"load average (1 min) before / after: {load['before']:.2f} / {load['after']:.2f} "
        f"on {load['cores']} cores",
        f"machine: {c['us_figures']['machine']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line of the comparison."""
    p = bench_parser(
        "bench.compare",
        __doc__.split("\n\n")[0],
        24,
        "a tiny model instead of flan-t5-small's shape",
        "compare.json",
    )
    p.add_argument("--epochs", type=float, default=1.0, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="longest answer (default: the target cap; --quick: 16)",
    )
    p.add_argument(
        "--peer-flush-subnormals",
        action="store_true",
        help="the peer flushes subnormal floats to zero on every thread, which the plain "
        "script does not (our loss makes none; the script's makes them, slow on some CPUs)",
    )
    p.add_argument(
        "--peer-mkl-avx512",
        action="store_true",
        help="the peer takes MKL's AVX-512 kernels on an AMD processor with AVX-512, as our "
        "dataflow does and the plain script does not",
    )
    p.add_argument(
        "--family",
        choices=DECODER_FAMILIES,
        help="a decoder-only model of this family, of flan-t5-small's size, and the plain "
        "script for a decoder-only model (bench.peer_causal)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run both sides this many times, alternating which goes first, and give the "
        "medians (default: %(default)s)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="both sides train in bf16 mixed precision (on a CPU: fast where it multiplies "
        "bf16 natively, AVX512-BF16 or AMX)",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    comparison = compare_rounds(
        Path(args.workdir or tempfile.mkdtemp(prefix="finetune-compare-")),
        args.rounds,
        quick=args.quick,
        records=args.records or (24 if args.quick else 400),
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or (16 if args.quick else 0),
        peer_flush_subnormals=args.peer_flush_subnormals,
        peer_mkl_avx512=args.peer_mkl_avx512,
        family=args.family,
        bf16=args.bf16,
    )
    print(table(comparison))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    print(f"\nComparison written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
