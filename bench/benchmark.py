"""Benchmark the whole dataflow on a model of flan-t5-small's shape, on this machine's CPU.

    python -m bench.benchmark                    # the full benchmark (a few minutes on 2 cores)
    python -m bench.benchmark --quick            # a tiny model: checks the benchmark itself runs
    python -m bench.benchmark --ablate fixed-padding --max-steps 8   # one lever switched off
    python -m bench.benchmark --nproc 2          # data-parallel: 2 processes under torchrun
    python -m bench.benchmark --family llama     # a decoder-only model of the same size

It builds the model locally (random weights; flan-t5-small's shape: d_model 512, 8+8 layers, 6
heads, gated-GELU d_ff 1024, vocabulary 32128) and a ~400-record dataset with a real support set's
length spread, runs the real DAG (start=base, 2 epochs, batch 8), and prints throughput, wall time
per stage (per node in the JSON's `node_seconds`), peak memory and the share of the machine's
measured matmul FLOP/s that training achieves in useful FLOPs. The figures are also written as JSON
(--out). `--family` takes a Llama-like decoder-only family of `finetune_module.tiny_model` instead
(`DECODER_FAMILIES`), built with flan-t5-small's width, depth and vocabulary (d_model 512, 8 layers,
8 heads, gated d_ff 1024, a learned tokenizer's vocabulary padded to 32128), trained on each
question's prompt followed by its answer.

Useful training FLOPs count real tokens only (no padding): the products that autograd runs,
forward and backward, for the stock model with the run's adapters on each training example
alone (`training_flops`): a frozen weight's product once more backwards (its input's gradient,
no weight gradient), a product of attention scores twice more (both operands' gradients) and an
adapter's product twice more (its input's and its weight's gradients). Earlier rounds counted 2 x
the forward pass (`forward_flops`, in the JSON as `twice_forward_train_gflops`), which left out
the attention's and the adapters' second backward product: 3-4% of the work on this data.
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hamilton import driver
from hamilton.lifecycle import api
from peft import PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    Seq2SeqTrainer,
    TrainerCallback,
)
from transformers.generation.utils import GenerationMixin

import finetune_module
from bench.data import DATA_VERSION, TOKENIZER_VOCABULARY, build_dataset, training_texts
from finetune_module.engine import (
    batching,
    distributed,
    generation,
    mkl_kernels,
    speedups,
    unpadded,
)
from finetune_module.engine.decoding import transformers_model
from finetune_module.engine.metrics import ROUGE_KEYS
from finetune_module.engine.settings import cpu_multiplies_bf16
from finetune_module.engine.trainer import FinetuneTrainer, trainer_callbacks
from finetune_module.tiny_model import Sizes, build, build_t5

REPO = Path(__file__).resolve().parent.parent

# The reference module, measured on this machine (2 cores) with this model shape and data kind.
REFERENCE = {
    "train_seconds_per_step": 12.4,
    "train_samples_per_second": 0.65,
    "train_seconds": 1149.0,
    "eval_seconds_per_answer": 21.6,
    "dag_seconds": 1594.0,
    "peak_rss_gb": 5.0,
}
GOALS = {"train": 4.0, "eval": 20.0, "dag": 5.0, "peak_rss_gb": 3.0, "matmul_share": 0.40}

SHAPES = {
    # flan-t5-small; the learned tokenizer is small (its vocabulary is padded to 32128): with it
    # the dataset has the reference's token spread (see bench/data.py)
    "flan-t5-small": {
        "d_model": 512,
        "d_kv": 64,
        "num_heads": 6,
        "num_layers": 8,
        "d_ff": 1024,
        "vocab_size": TOKENIZER_VOCABULARY,
        "pad_vocab_to": 32128,
    },
    "tiny": {"d_model": 32, "num_heads": 2, "num_layers": 1, "d_ff": 64, "vocab_size": 1000},
}
#: A decoder-only model of flan-t5-small's width and depth (`decoder_model`).
DECODER_SIZES = Sizes(vocab_size=TOKENIZER_VOCABULARY, d_model=512, num_layers=8, num_heads=8,
                      d_ff=1024)  # fmt: skip
#: The decoder-only families `--family` takes: Llama's layout (q, k, v and o projections, a
#: gated feed-forward), which `forward_flops` counts.
DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

ABLATIONS = {
    "none": "every lever on (the product as shipped)",
    "fixed-padding": "pad every input and target to its cap, as the reference did",
    "no-grouping": "random batches instead of length-grouped ones",
    "unbatched-generation": "answer one question at a time, up to 512 new tokens",
    "one-thread": "torch on one thread instead of both cores",
    "stock-dropout": "torch's nn.Dropout and SDPA's attention dropout (32-bit draws, float masks)",
    "sdpa-dropout": "SDPA's own dropout on the attention weights (the layers' dropout stays cheap)",
    "python-gelu": "T5's tanh GELU as five tensor operations instead of one kernel",
    "system-malloc": "glibc's default allocator settings (big blocks mapped and unmapped) "
    "and oneDNN's default cache sizes",
    "mkl-avx2": "MKL's own choice of kernels (its AVX2 ones on an AMD processor with AVX-512)",
    "eval-logits": "the trainer's evaluations keep every logit (prediction_loss_only off)",
    "input-grouping": "Hugging Face's group_by_length batches (input length only)",
    "no-swaps": "batches as the windows sorted them, no examples swapped between them",
    "stock-loss": "the model's own loss (keeps the 32k-wide logits and their log-softmax)",
    "no-memory-budget": "no activation-memory budget (activation_memory_gb None)",
    "padded": "T5 trains on padded batches, not on their real tokens laid end to end",
    "one-worker": "each training step on the calling thread alone, torch on every core",
    "padding-mask": "a decoder-only model reads its batches with their padding mask, not the "
    "causal mask alone",
}
# the pieces of the CPU speed layer the ablations above switch off (input `cpu_speedups`)
_SPEEDUPS_OFF = {
    "stock-dropout": ("cheap_dropout", "attention_dropout"),
    "sdpa-dropout": ("attention_dropout",),
    "python-gelu": ("fused_gelu",),
    "system-malloc": ("allocator",),
    "mkl-avx2": ("mkl_avx512",),
    "stock-loss": ("logit_free_loss",),
    "padded": ("unpadded",),
    "one-worker": ("worker_threads",),
    "padding-mask": ("causal_mask",),
}


class _NodeTimer(api.NodeExecutionHook):
    """Records how long each node of the DAG takes (`seconds`, by node) and which node is
    running (`running`, None between nodes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.running: str | None = None
        self._started: dict[str, float] = {}

    def run_before_node_execution(self, *, node_name: str, **kwargs: Any) -> None:
        self._started[node_name] = time.perf_counter()
        self.running = node_name

    def run_after_node_execution(self, *, node_name: str, **kwargs: Any) -> None:
        self.seconds[node_name] = time.perf_counter() - self._started.pop(node_name)
        self.running = None


class _FixedLengthCollator:
    """The reference's padding: inputs padded to the source cap, targets to the target cap."""

    def __init__(self, pad_token_id: int, source_length: int, target_length: int) -> None:
        self.pad, self.source_length, self.target_length = (
            pad_token_id,
            source_length,
            target_length,
        )

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [
            f["input_ids"] + [self.pad] * (self.source_length - len(f["input_ids"]))
            for f in features
        ]
        mask = [
            [1] * len(f["input_ids"]) + [0] * (self.source_length - len(f["input_ids"]))
            for f in features
        ]
        labels = [f["labels"] + [-100] * (self.target_length - len(f["labels"])) for f in features]
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
        }


def _generation_counts() -> dict[str, float]:
    """Counts of generation, all zero: tokens, answers and seconds generating."""
    return {"tokens": 0.0, "answers": 0.0, "seconds": 0.0}


@contextlib.contextmanager
def _counting_generation(counts: dict[str, dict[str, float]], timer: _NodeTimer) -> Iterator[None]:
    """Counts the tokens generation produces (and its time) while the block runs, by the node
    that calls it (`counts[node]`, see `_generation_counts`): Hugging Face `generate`'s and the
    lean decoding loop's."""

    def counting(run: Any) -> Any:
        def counted(model: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            output = run(model, *args, **kwargs)
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            config = transformers_model(model).config
            if config.is_encoder_decoder:
                new = sequences[:, 1:]  # after the decoder start token
            else:  # after the prompts (both paths take the ids first, then the pad id fourth)
                new = sequences[:, kwargs.get("input_ids", args[0] if args else None).shape[1] :]
            pad = kwargs.get("pad_token_id", args[3] if len(args) > 3 else config.pad_token_id)
            node = counts.setdefault(str(timer.running), _generation_counts())
            node["tokens"] += int((new != pad).sum())
            node["answers"] += int(sequences.shape[0])
            node["seconds"] += time.perf_counter() - started
            return output

        return counted

    stock, lean = GenerationMixin.generate, generation.greedy_generate
    GenerationMixin.generate, generation.greedy_generate = counting(stock), counting(lean)
    try:
        yield
    finally:
        GenerationMixin.generate, generation.greedy_generate = stock, lean


def cpu() -> dict[str, Any]:
    """This machine's CPU as the figures depend on it: its `name`, `vendor`, `family` and
    `model` (from /proc/cpuinfo; None where the system has none), its `cores`, the vector
    instructions torch's own kernels use here (`torch_kernels`: "AVX2", "AVX512", ...), and
    whether it multiplies bfloat16 natively (`bf16_products`, as the `bf16` setting checks
    it). Two machines that both call themselves "AMD EPYC" can differ in all but the name:
    one with AVX2 only, one with AVX-512 and bf16, and their figures with them."""
    fields = mkl_kernels.cpu_fields()
    return {
        "name": fields.get("model name") or platform.processor() or None,
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "cores": os.cpu_count(),
        "torch_kernels": torch.backends.cpu.get_cpu_capability(),
        "bf16_products": cpu_multiplies_bf16(),
    }


def machine_line(c: dict[str, Any]) -> str:
    """`cpu()`'s figures as one line, e.g. "AMD EPYC (AuthenticAMD, family 25, model 17), 2
    cores, torch's kernels AVX512, bf16 products native"."""
    labelled = (("", c["vendor"]), ("family ", c["family"]), ("model ", c["model"]))
    where = ", ".join(label + value for label, value in labelled if value)
    name = (c["name"] or platform.machine()) + (f" ({where})" if where else "")
    bf16 = "native" if c["bf16_products"] else "not native"
    return f"{name}, {c['cores']} cores, torch's kernels {c['torch_kernels']}, bf16 products {bf16}"


def matmul_gflops(
    n: int = 2048, repeats: int = 8, trials: int = 3, dtype: torch.dtype = torch.float32
) -> float:
    """The machine's matmul throughput: the best of a few timed `torch.matmul` runs (on the GPU
    when there is one, in `dtype`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def forward_flops(config: PretrainedConfig, source_length: int, target_length: int) -> float:
    """Multiply-add FLOPs (x2) of one T5 forward pass over one unpadded example; for a
    decoder-only model of `DECODER_FAMILIES`, of one pass over its prompt and answer (of
    `source_length` and `target_length` tokens), the output layer over the answer's tokens."""
    if not config.is_encoder_decoder:
        return _decoder_forward_flops(config, source_length + target_length, target_length)
    d, inner, d_ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    ffn = (3 if config.is_gated_act else 2) * d * d_ff
    s, t = source_length, target_length
    encoder = config.num_layers * (s * (4 * d * inner + ffn) + 2 * s * s * inner)
    decoder = config.num_decoder_layers * (
        t * (4 * d * inner + 2 * d * inner + ffn)  # self-attention, cross q/o, feed-forward
        + s * 2 * d * inner  # cross-attention keys and values of the encoder states
        + 2 * t * t * inner  # self-attention scores and mix
        + 2 * t * s * inner  # cross-attention scores and mix
    )
    return 2.0 * (encoder + decoder + t * d * config.vocab_size)


def _decoder_forward_flops(config: PretrainedConfig, tokens: int, predicted: int) -> float:
    """Multiply-add FLOPs (x2) of a Llama-like decoder-only model's pass over `tokens` tokens,
    with the output layer over `predicted` of them."""
    d, head = config.hidden_size, config.head_dim
    queries, keys = config.num_attention_heads * head, config.num_key_value_heads * head
    projections = d * (2 * queries + 2 * keys)  # q and o; k and v
    layer = tokens * (projections + 3 * d * config.intermediate_size) + 2 * tokens**2 * queries
    return 2.0 * (config.num_hidden_layers * layer + predicted * d * config.vocab_size)


#: Lengths (source, target) at which `training_flops` counts a pass: enough points to fix a
#: polynomial of degree 2 in both lengths, and more to check it.
_COUNTED_LENGTHS = ((1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (4, 4), (5, 2), (3, 6), (7, 5))


def _pass_flops(model: torch.nn.Module, source: int, target: int) -> int:
    """The matmul FLOPs torch counts for one example of `source` and `target` tokens, forward
    and backward, through `model` (in training mode; a decoder-only model reads them as one
    sequence, with its output layer over the last `target` tokens)."""
    ids = torch.randint(3, 100, (1, source))
    answer = torch.randint(3, 100, (1, target))
    with FlopCounterMode(display=False) as counter:
        if model.config.is_encoder_decoder:
            logits = model(input_ids=ids, decoder_input_ids=answer).logits
        else:
            logits = model(input_ids=torch.cat([ids, answer], 1), logits_to_keep=target).logits
        logits.sum().backward()
    return counter.get_total_flops()


def training_flops(trained: torch.nn.Module) -> Callable[[int, int], float]:
    """The useful FLOPs of training on one example, as a function of its source and target
    lengths: the products that autograd runs, forward and backward, for the stock model with
    `trained`'s adapters (or, fully trained, its weights' gradients) on that example alone, with
    no padding. The backward pass takes one product per frozen weight whose input needs a
    gradient (not the first layer's query, key and value, which read the embeddings), two per
    product of attention scores (one per operand that needs a gradient), and three per
    adapter's (its input's gradient and both of its weights'): so the count is not twice the
    forward pass's. The model is built from `trained`'s configuration (random weights, eager
    attention so that torch counts its products) and counted at a few short lengths; the count
    is a polynomial of degree 2 in the two lengths, fitted exactly and checked on the rest."""
    base = trained.get_base_model() if isinstance(trained, PeftModel) else trained
    config = copy.deepcopy(base.config)
    config._attn_implementation = "eager"
    kind = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = kind.from_config(config)
    if isinstance(trained, PeftModel):
        model = get_peft_model(model, copy.deepcopy(trained.peft_config["default"]))
    model.train()
    points = [(s, t, _pass_flops(model, s, t)) for s, t in _COUNTED_LENGTHS]

    def terms(s: int, t: int) -> list[int]:
        return [1, s, t, s * s, t * t, s * t]

    basis = torch.tensor([terms(s, t) for s, t, _ in points], dtype=torch.float64)
    counts = torch.tensor([flops for *_, flops in points], dtype=torch.float64)
    coefficients = torch.linalg.lstsq(basis, counts[:, None]).solution[:, 0].tolist()

    def flops(source: int, target: int) -> float:
        return sum(c * x for c, x in zip(coefficients, terms(source, target), strict=True))

    worst = max(abs(flops(s, t) - counted) / counted for s, t, counted in points)
    if worst > 1e-9:
        raise RuntimeError(f"the training FLOPs are not a polynomial of degree 2 ({worst:.2e})")
    return flops


# the upper ends of the bands of padded input length that the steps are grouped by
STEP_BANDS = (128, 256, 384)


class StepClock(TrainerCallback):
    """The wall time of every training step and the padded shape of each forward pass it ran:
    (rows, input tokens, target tokens), seen by a hook on the model's forward pass while it
    trains. A batch over the activation budget goes forward in parts, each padded to its own
    longest example (`memory.ActivationBudget.parts`): one shape per part. A part laid end to
    end (`unpadded`) is counted by the padded shape it was laid out from. A decoder-only
    model's pass is counted as its whole sequence's, without the output layer (its labels,
    which say which tokens it predicts, do not reach the model with the logit-free loss)."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[tuple[int, int, int]], float]] = []
        self._shapes: list[tuple[int, int, int]] = []
        self._started = 0.0
        self._hook: Any = None

    def _seen(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        targets = kwargs.get("decoder_input_ids", kwargs.get("labels"))
        if not module.training or ids is None:
            return
        layout = unpadded.current_layout()
        if layout is not None:
            self._shapes.append((layout.inputs.rows, layout.inputs.width, layout.targets.width))
        else:
            self._shapes.append((*ids.shape, 0 if targets is None else targets.shape[1]))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hooks the model's forward pass."""
        self._hook = kwargs["model"].register_forward_pre_hook(self._seen, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Starts the step's clock."""
        self._shapes, self._started = [], time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Records the step's shapes and seconds."""
        if self._shapes:
            self.steps.append((self._shapes, time.perf_counter() - self._started))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Removes the hook."""
        if self._hook is not None:
            self._hook.remove()


def step_bands(
    steps: list[tuple[list[tuple[int, int, int]], float]], config: PretrainedConfig
) -> list[dict[str, Any]]:
    """The steps grouped by their batch's padded input length (`STEP_BANDS`; a batch that went
    in parts: its longest part's): how many, their seconds, and the GFLOP/s they ran at
    counting every padded token of the passes they ran (a step's work as the benchmark counts
    useful work, but on its padded shapes)."""
    bands: list[dict[str, Any]] = []
    longest = [max(source for _, source, _ in shapes) for shapes, _ in steps]
    lower = 0
    for upper in (*STEP_BANDS, None):
        inside = [
            step for step, top in zip(steps, longest, strict=True) if lower < top <= (upper or top)
        ]
        seconds = sum(sec for _, sec in inside)
        flops = sum(
            2 * rows * forward_flops(config, s, t) for shapes, _ in inside for rows, s, t in shapes
        )
        bands.append(
            {
                "input_tokens": f"{lower + 1}-{upper}" if upper else f">{lower}",
                "steps": len(inside),
                "parts": sum(len(shapes) for shapes, _ in inside),
                "seconds": seconds,
                "padded_gflops": flops / seconds / 1e9 if seconds else 0.0,
            }
        )
        lower = upper or lower
    return bands


def _summed_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the processes of a data-parallel run (times: the slowest's)."""
    if distributed.world_size() == 1:
        return values
    from accelerate.utils import gather_object

    every = gather_object([values])
    return {
        k: max(v[k] for v in every) if k == "seconds" else sum(v[k] for v in every) for k in values
    }


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Runs the benchmark in `--nproc` processes under torchrun, each with its share of cores;
    the machine's matmul peak is measured first, with every core."""
    prepare(Path(args.workdir), args.quick, args.records, args.family)  # once, before they start
    peak = matmul_gflops()
    rest = [
        a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "bench.benchmark", *rest,
               "--matmul-peak", str(peak)]  # fmt: skip
    return subprocess.run(command, env=env, cwd=REPO).returncode


def _overrides(ablation: str, caps: dict[str, Any]) -> dict[str, Any]:
    """Hamilton overrides that switch one lever off."""
    if ablation == "fixed-padding":
        return {
            "data_collator": _FixedLengthCollator(
                caps["tokenizer"].pad_token_id, caps["source_length_cap"], caps["target_length_cap"]
            )
        }
    if ablation == "unbatched-generation":
        return {"generation_settings": {"num_beams": 1, "max_new_tokens": 512, "batch_size": 1}}
    return {}


def prepare(work: Path, quick: bool, records: int, family: str | None = None) -> tuple[Path, Path]:
    """The benchmark's dataset (`records` records) and model (a tiny one if `quick`, else
    flan-t5-small's shape; with `family`, a decoder-only model of that family and of
    flan-t5-small's width, depth and vocabulary: `decoder_model`) in `work`, built unless
    already there: their paths."""
    work.mkdir(parents=True, exist_ok=True)
    size = "tiny" if quick else "flan-t5-small"
    data_path = work / f"bench-data-{DATA_VERSION}-{records}.json"
    if not data_path.exists():
        build_dataset(REPO / "example-support-dataset.json", data_path, records=records)
    if family is not None:
        vocabulary = None if quick else SHAPES["flan-t5-small"]["pad_vocab_to"]
        return data_path, decoder_model(work, data_path, family, quick, vocabulary)
    model_dir = work / f"model-{size}-{DATA_VERSION}-{records}"
    if not (model_dir / "model.safetensors").exists():
        build_t5(str(model_dir), training_texts(data_path), **SHAPES[size])
    return data_path, model_dir


def decoder_model(
    work: Path, data_path: Path, family: str, quick: bool, pad_vocab_to: int | None = None
) -> Path:
    """The directory of a decoder-only model of `family` with `DECODER_SIZES` (tiny ones if
    `quick`) and a tokenizer of its kind learned from the benchmark's texts, in `work`, built
    unless already there; with `pad_vocab_to`, its vocabulary padded to that many tokens (as
    the benchmark's T5 has flan-t5-small's, so that its output layer costs what a real one
    does)."""
    padded = f"-vocab{pad_vocab_to}" if pad_vocab_to else ""
    model_dir = work / f"model-{family}{'-tiny' if quick else ''}{padded}-{data_path.stem}"
    if not (model_dir / "model.safetensors").exists():
        sizes = Sizes() if quick else DECODER_SIZES
        build(str(model_dir), training_texts(data_path), family, sizes)
        if pad_vocab_to:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            model.resize_token_embeddings(pad_vocab_to, mean_resizing=False)
            model.save_pretrained(model_dir)
    return model_dir


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the model and data, runs the DAG once, and returns the figures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # as the DAG's model does, before any oneDNN or MKL product (the matmul peak's below)
    if args.ablate != "system-malloc":
        speedups.bounded_onednn_caches()
    mkl_avx512 = args.ablate != "mkl-avx2" and mkl_kernels.use_avx512_kernels()
    if args.ablate == "one-thread":
        torch.set_num_threads(1)
    if args.ablate == "input-grouping":
        FinetuneTrainer._get_train_sampler = Seq2SeqTrainer._get_train_sampler
    if args.ablate == "no-swaps":
        batching.fewer_padded_tokens = lambda batches, sources, targets: batches
    work = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-bench-"))
    data_path, model_dir = prepare(work, args.quick, args.records, args.family)
    # under --nproc the launcher measured the peak with every core before starting the ranks
    peak_gflops = args.matmul_peak or matmul_gflops(
        n=512 if args.quick else 2048, dtype=torch.bfloat16 if args.bf16 else torch.float32
    )

    timer = _NodeTimer()
    dr = (
        driver.Builder()
        .with_config({"start": "base", **({"model_type": "causal"} if args.family else {})})
        .with_modules(*finetune_module.MODULES)
        .with_adapters(timer)
        .build()
    )
    inputs: dict[str, Any] = {
        "data_path": str(data_path),
        "input_text_key": "question",
        "output_text_key": "reply",
        "model_id": str(model_dir),
        "output_dir": str(work / "run"),
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "extra_training_args": {"disable_tqdm": True, "logging_strategy": "no"},
    }
    if args.max_steps:
        inputs["max_steps"] = args.max_steps
    if args.max_new_tokens:
        inputs["max_new_tokens"] = args.max_new_tokens
    if args.bf16:
        inputs["bf16"] = True
    if args.ablate == "no-grouping":
        inputs["extra_training_args"]["train_sampling_strategy"] = "random"
    if args.ablate == "eval-logits":
        inputs["extra_training_args"]["prediction_loss_only"] = False
    if args.ablate == "no-memory-budget":
        inputs["activation_memory_gb"] = None
    if args.ablate in _SPEEDUPS_OFF:
        off = _SPEEDUPS_OFF[args.ablate]
        inputs["cpu_speedups"] = [name for name in speedups.SPEEDUPS if name not in off]
    caps = dr.execute(["tokenizer", "source_length_cap", "target_length_cap"], inputs=inputs)
    overrides = _overrides(args.ablate, caps)

    by_node: dict[str, dict[str, float]] = {}
    outputs = [
        *finetune_module.DEFAULT_OUTPUTS,
        "tokenized_train",
        "finetuned_model",
        "finetuned_hold_out_metrics",
    ]
    started = time.perf_counter()
    clock = StepClock()
    with _counting_generation(by_node, timer), trainer_callbacks([clock]):
        result = dr.execute(outputs, inputs=inputs, overrides=overrides)
    dag_seconds = time.perf_counter() - started

    every_node = {k: sum(c[k] for c in by_node.values()) for k in _generation_counts()}
    counts = _summed_over_processes(every_node)
    finetuned = _summed_over_processes(by_node.get("finetuned_answers", _generation_counts()))
    metrics = result["training_and_validation_set_metrics"]
    config = result["finetuned_model"].get_base_model().config
    train = result["tokenized_train"]
    epochs = metrics["epoch"]
    real_tokens = sum(len(x["input_ids"]) + len(x["labels"]) for x in train) * epochs
    lengths = [(len(x["input_ids"]), len(x["labels"])) for x in train]
    per_example = training_flops(result["finetuned_model"])
    useful_flops = sum(per_example(s, t) for s, t in lengths) * epochs
    twice_forward = 2 * sum(forward_flops(config, s, t) for s, t in lengths) * epochs
    train_seconds = metrics["train_runtime"]
    steps_seconds = sum(seconds for _, seconds in clock.steps)
    steps = metrics["global_step"]
    modules = {
        v.name: v.originating_functions[0].__module__.rsplit(".", 1)[-1]
        for v in dr.list_available_variables()
        if v.originating_functions
    }
    stages: dict[str, float] = {}
    for node, seconds in timer.seconds.items():
        stage = modules.get(node, "other")
        stages[stage] = stages.get(stage, 0.0) + seconds
    achieved = useful_flops / train_seconds / 1e9
    this_cpu = cpu()
    eval_per_answer = counts["seconds"] / max(1, counts["answers"])
    figures = {
        "ablation": args.ablate,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "model": _model_name(args),
        "records": args.records,
        "train_examples": len(train),
        "epochs": epochs,
        "steps": steps,
        "source_length_cap": caps["source_length_cap"],
        "target_length_cap": caps["target_length_cap"],
        "median_source_tokens": sorted(len(x["input_ids"]) for x in train)[len(train) // 2],
        "median_target_tokens": sorted(len(x["labels"]) for x in train)[len(train) // 2],
        "train_seconds": train_seconds,
        "train_seconds_per_step": train_seconds / steps,
        "train_samples_per_second": len(train) * epochs / train_seconds,
        "train_tokens_per_second": real_tokens / train_seconds,
        "useful_train_gflops": achieved,
        "matmul_peak_gflops": peak_gflops,
        "matmul_share": achieved / peak_gflops,
        "steps_seconds": steps_seconds,
        "steps_useful_gflops": useful_flops / steps_seconds / 1e9,
        "steps_matmul_share": useful_flops / steps_seconds / 1e9 / peak_gflops,
        "twice_forward_train_gflops": twice_forward / train_seconds / 1e9,
        "steps_by_input_length": step_bands(clock.steps, config),
        "generated_answers": counts["answers"],
        "generated_tokens": counts["tokens"],
        "generation_seconds": counts["seconds"],
        "generated_tokens_per_second": counts["tokens"] / max(1e-9, counts["seconds"]),
        "answers_per_second": counts["answers"] / max(1e-9, counts["seconds"]),
        "eval_seconds_per_answer": eval_per_answer,
        # the fine-tuned model's answers alone (the base model's are the rest)
        "finetuned_generated_answers": finetuned["answers"],
        "finetuned_generated_tokens": finetuned["tokens"],
        "finetuned_answers_seconds": timer.seconds.get("finetuned_answers", 0.0),
        "base_answers_seconds": timer.seconds.get("base_answers", 0.0),
        "stage_seconds": dict(sorted(stages.items(), key=lambda kv: -kv[1])),
        "node_seconds": dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1])),
        "dag_seconds": dag_seconds,
        "peak_rss_gb": _summed_over_processes(  # in GiB: ru_maxrss is in KiB
            {"gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
        )["gb"],
        "processes": distributed.world_size(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": machine_line(this_cpu),
        "cpu": this_cpu,
        "mkl_avx512": mkl_avx512,
        "eval_loss": metrics["eval_loss"],
        "rouge": {k: metrics[k] for k in ROUGE_KEYS},
        "hold_out_rouge": {k: result["finetuned_hold_out_metrics"][k] for k in ROUGE_KEYS},
    }
    if not args.max_steps and not args.quick and not args.family:
        figures["speedup_vs_reference"] = {
            "train": REFERENCE["train_seconds"] / train_seconds,
            "eval_per_answer": REFERENCE["eval_seconds_per_answer"] / eval_per_answer,
            "dag": REFERENCE["dag_seconds"] / dag_seconds,
        }
    return figures


def _model_name(args: argparse.Namespace) -> str:
    """The benchmark's model, in words."""
    if args.family:
        return f"{args.family}, {'tiny' if args.quick else 'flan-t5-small size'}"
    return "tiny" if args.quick else "flan-t5-small shape"


def _table(f: dict[str, Any]) -> str:
    """The figures as a short text table."""
    rows = [
        ("model / ablation", f"{f['model']} / {f['ablation']}"),
        ("machine", f["machine"]),
        ("MKL's AVX-512 kernels", "taken (an AMD CPU with AVX-512)" if f["mkl_avx512"] else "no"),
        ("processes x torch threads", f"{f['processes']} x {f['torch_threads']}"),
        (
            "train examples x epochs",
            f"{f['train_examples']} x {f['epochs']:g} ({f['steps']} steps)",
        ),
        (
            "median tokens in / out",
            f"{f['median_source_tokens']} / {f['median_target_tokens']}"
            f"  (caps {f['source_length_cap']} / {f['target_length_cap']})",
        ),
        ("train wall", f"{f['train_seconds']:.1f} s  ({f['train_seconds_per_step']:.2f} s/step)"),
        ("train samples/s", f"{f['train_samples_per_second']:.2f}"),
        ("train tokens/s (real)", f"{f['train_tokens_per_second']:.0f}"),
        (
            "useful train GFLOP/s",
            f"{f['useful_train_gflops']:.1f}  of matmul peak "
            f"{f['matmul_peak_gflops']:.1f}  = {100 * f['matmul_share']:.0f}%",
        ),
        (
            "  over the steps alone",
            f"{f['steps_useful_gflops']:.1f}  = {100 * f['steps_matmul_share']:.0f}%  "
            f"({f['steps_seconds']:.1f} s; the train wall also holds the epochs' validation)",
        ),
        *(
            (
                f"  steps, {band['input_tokens']} tokens in",
                f"{band['steps']} in {band['seconds']:.1f} s"
                + (f" ({band['parts']} parts)" if band["parts"] > band["steps"] else "")
                + ", "
                f"{band['padded_gflops']:.0f} GFLOP/s (padded)",
            )
            for band in f["steps_by_input_length"]
            if band["steps"]
        ),
        (
            "generated answers",
            f"{f['generated_answers']:.0f} in {f['generation_seconds']:.1f} s "
            f"({f['eval_seconds_per_answer']:.2f} s/answer, "
            f"{f['answers_per_second']:.2f} answers/s)",
        ),
        ("generated tokens/s", f"{f['generated_tokens_per_second']:.0f}"),
        ("whole DAG wall", f"{f['dag_seconds']:.1f} s"),
        ("peak RSS", f"{f['peak_rss_gb']:.2f} GiB"),
    ]
    rows += [(f"  stage {k}", f"{v:.1f} s") for k, v in f["stage_seconds"].items()]
    if "speedup_vs_reference" in f:
        s = f["speedup_vs_reference"]
        rows += [
            (
                "speed-up vs reference",
                f"train {s['train']:.1f}x (goal {GOALS['train']:g}x), "
                f"eval {s['eval_per_answer']:.0f}x (goal {GOALS['eval']:g}x), "
                f"DAG {s['dag']:.1f}x (goal {GOALS['dag']:g}x)",
            ),
        ]
    return aligned(rows)


def shown(table: str, figures: dict[str, Any], out: str) -> None:
    """Prints the table and writes the figures to the JSON file `out` (and says where)."""
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"\nFigures written to {out}")


def aligned(rows: list[tuple[str, str]]) -> str:
    """(name, value) rows as text, the values in one column."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def bench_parser(
    prog: str, description: str, quick_records: int, quick_help: str, results: str
) -> argparse.ArgumentParser:
    """A bench command's parser with the flags every bench command has: --quick, --records,
    --workdir, and --out (default: `bench/results/<results>`)."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--records", type=int, help=f"dataset size (default: 400, --quick: {quick_records})"
    )
    p.add_argument("--workdir", help="where the model, data and runs go (default: a temp dir)")
    p.add_argument(
        "--out",
        default=str(REPO / "bench" / "results" / results),
        help="JSON file for the figures (default: %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark."""
    p = bench_parser(
        "bench.benchmark",
        __doc__.split("\n\n")[0],
        60,
        "a tiny model instead of flan-t5-small's shape",
        "latest.json",
    )
    p.add_argument("--epochs", type=float, help="default: 2 (--quick: 1)")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument(
        "--max-steps", type=int, default=0, help="stop training after N steps (ablations)"
    )
    p.add_argument(
        "--ablate",
        choices=sorted(ABLATIONS),
        default="none",
        help="switch one lever off: " + "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()),
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=0, help="longest answer (default: the target cap)"
    )
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (torchrun)")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast (a CUDA GPU with bf16 support, or the CPU: fast where it "
        "multiplies bf16 natively, AVX512-BF16 or AMX)",
    )
    p.add_argument(
        "--family",
        choices=DECODER_FAMILIES,
        help="a decoder-only model of this family, of flan-t5-small's size, instead",
    )
    p.add_argument("--matmul-peak", type=float, help=argparse.SUPPRESS)  # set by --nproc
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.family and args.ablate in ("fixed-padding", "padded"):
        p.error(f"--ablate {args.ablate} concerns the sequence-to-sequence model only")
    if not args.family and args.ablate == "padding-mask":
        p.error("--ablate padding-mask concerns a decoder-only model (--family) only")
    args.records = args.records or (60 if args.quick else 400)
    args.epochs = args.epochs or (1 if args.quick else 2)
    if args.nproc > 1:
        if not args.workdir:
            args.workdir = tempfile.mkdtemp(prefix="finetune-bench-")
            argv = [*argv, "--workdir", args.workdir]  # one directory for every process
        return _launch(args, argv)
    figures = run(args)
    if not distributed.is_main_process():
        distributed.end()
        return 0
    shown(_table(figures), figures, args.out)
    distributed.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
