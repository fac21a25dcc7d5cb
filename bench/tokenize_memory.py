"""Peak memory and time of the data and tokenization stages on many short records.

    python -m bench.tokenize_memory --records 1000000          # 1M records, a tiny T5
    python -m bench.tokenize_memory --records 1000000 --family gpt2   # a decoder-only model

It writes `--records` short question/answer records (5 to 11 words each, drawn from a fixed
word list) to a JSON Lines file, builds a tiny model of `--family` with a tokenizer learned
from the first records, then runs the real DAG (start=base) in a fresh Python process twice: up to
the data stage's sets and prompts (`data_stage`), and up to `tokenized_train`,
`tokenized_validation` and `tokenized_hold_out` (`tokenization_stage`: both stages). It prints
each process's peak resident memory (`ru_maxrss`, imports included: `rss_before_run_gb`) and the
wall time of each stage. The data and model are kept in `--workdir` and re-used. The
figures are also written as JSON (--out).
"""

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOKENIZED = ["tokenized_train", "tokenized_validation", "tokenized_hold_out"]
#: What each measured run computes: the data stage alone, then the data and tokenization stages.
OUTPUTS = {
    "data": ["train_set", "validation_set", "hold_out_set", "prompt_texts"],
    "tokenization": TOKENIZED,
}
DATA_VERSION = "v1"  # names the generated data file: change it when the records change
TOKENIZER_RECORDS = 20_000  # the tokenizer learns from the first records' texts
CHUNK = 100_000  # records drawn at a time
TINY = {"vocab_size": 1000, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64}


def _words(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct made-up words of 2 to 9 letters."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: dict[str, None] = {}
    while len(words) < count:
        words["".join(rng.choice(letters, size=rng.integers(2, 10)))] = None
    return list(words)


def write_records(path: Path, records: int, seed: int = 0) -> Path:
    """Writes `records` question/answer records of 5 to 11 words each as JSON Lines (the first
    records are the same whatever the count)."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(_words(3000, rng))
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for start in range(0, records, CHUNK):
            lengths = rng.integers(5, 12, size=(CHUNK, 2))
            # Zipf-like word frequencies, as in real text
            ranks = np.minimum(rng.zipf(1.2, size=(CHUNK, 22)), len(vocabulary)) - 1
            drawn = vocabulary[ranks][: records - start]
            for (q, a), words in zip(lengths, drawn, strict=False):
                question = " ".join(words[:q]).capitalize() + "?"
                reply = " ".join(words[11 : 11 + a]).capitalize() + "."
                f.write(json.dumps({"question": question, "reply": reply}) + "\n")
    partial.replace(path)
    return path


def _prepare(records: int, family: str, work: Path) -> dict[str, str]:
    """The records and the tiny model in `work`, built unless already there: their paths and
    the model's kind (the dataflow's model_type)."""
    from finetune_module.tiny_model import FAMILIES, Sizes, build

    work.mkdir(parents=True, exist_ok=True)
    data_path = work / f"short-records-{DATA_VERSION}-{records}.jsonl"
    if not data_path.exists():
        write_records(data_path, records)
    model_dir = work / f"tiny-{family}-{DATA_VERSION}"
    if not (model_dir / "config.json").exists():
        with open(data_path, encoding="utf-8") as f:
            first = [json.loads(line) for line in itertools.islice(f, TOKENIZER_RECORDS)]
        texts = [text for record in first for text in record.values()]
        build(str(model_dir), texts, family, Sizes(**TINY))
    return {"data": str(data_path), "model": str(model_dir), "kind": FAMILIES[family].kind}


def _peak_gb() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _child(outputs: str, data_path: str, model_dir: str, model_type: str) -> dict[str, Any]:
    """Runs the DAG up to `OUTPUTS[outputs]` in this process; returns its peak memory and the
    wall time of each stage."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hamilton.lifecycle import api

    import finetune_module

    class StageClock(api.NodeExecutionHook):
        """The wall time of each stage (the module its nodes are in)."""

        def __init__(self) -> None:
            self.seconds: dict[str, float] = {}
            self._started = 0.0

        def run_before_node_execution(self, **kwargs: Any) -> None:
            self._started = time.perf_counter()

        def run_after_node_execution(self, *, node_tags: dict[str, Any], **kwargs: Any) -> None:
            stage = str(node_tags.get("module", "")).rpartition(".")[2]
            elapsed = time.perf_counter() - self._started
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed

    clock = StageClock()
    dr = finetune_module.build_driver("base", model_type=model_type, adapters=[clock])
    before = _peak_gb()
    started = time.perf_counter()
    dr.execute(
        OUTPUTS[outputs],
        inputs={
            "data_path": data_path,
            "input_text_key": "question",
            "output_text_key": "reply",
            "model_id": model_dir,
        },
    )
    return {
        "peak_rss_gb": round(_peak_gb(), 3),
        "rss_before_run_gb": round(before, 3),
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": {stage: round(s, 1) for stage, s in clock.seconds.items() if s >= 0.05},
    }


def _in_a_fresh_process(*arguments: str) -> Any:
    """What `python -m bench.tokenize_memory *arguments` prints last, as JSON."""
    command = [sys.executable, "-m", "bench.tokenize_memory", *arguments]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the records and the model, measures the data stage alone and then the data and
    tokenization stages, each in a fresh process, and returns the figures.

    This process builds nothing itself and stays small: on Linux a child's `ru_maxrss` starts
    at the resident memory of the process that started it."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-tokenize-"))
    built = _in_a_fresh_process("--prepare", str(args.records), args.family, str(work))
    return {
        "records": args.records,
        "family": args.family,
        **{
            f"{outputs}_stage": _in_a_fresh_process(
                "--child", outputs, built["data"], built["model"], built["kind"]
            )
            for outputs in OUTPUTS
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Command line of the measurement."""
    p = argparse.ArgumentParser(
        prog="python -m bench.tokenize_memory", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--records", type=int, default=1_000_000, help="default: %(default)s")
    p.add_argument("--family", default="t5", help="tiny model family (default: %(default)s)")
    p.add_argument("--workdir", help="where the records and model go (default: a temp dir)")
    p.add_argument(
        "--out",
        default=str(REPO / "bench" / "results" / "tokenize_memory.json"),
        help="JSON file for the figures (default: %(default)s)",
    )
    p.add_argument("--prepare", nargs=3, help=argparse.SUPPRESS)  # builds the data and model
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # the measured process
    args = p.parse_args(argv)
    if args.prepare:
        records, family, work = args.prepare
        print(json.dumps(_prepare(int(records), family, Path(work))))
        return 0
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    figures = run(args)
    print(json.dumps(figures, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
