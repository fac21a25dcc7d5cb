"""Fine-tune a sequence-to-sequence model with LoRA on your question/answer data, from the shell.

    python run.py --data example-support-dataset.json --model-id google/flan-t5-small
    python run.py --config run.yaml --num_train_epochs 3      # flags override the file
    python run.py --start presaved --data example-support-dataset.json   # evaluate a saved one
    python run.py --dag dag.png                               # draw the stages, then exit
    python run.py --dag training.png --dag-stage training     # one stage's nodes in full
    python run.py --data d.json --model-id ./tiny-gpt2 --model-type causal   # decoder-only
    python run.py --data qa.parquet --cache .hamilton_cache   # re-runs re-use what is unchanged
    python run.py --source sql --data sqlite:///qa.db --sql-table qa --mlflow
    python run.py predict --model-dir finetuned-model/best_model "How do I ...?"
    python run.py export --model-dir finetuned-model/best_model --to merged-model

Every setting is an input of the Hamilton dataflow in `finetune_module/`; a YAML file given with
--config uses the same names as the inputs (data_path, model_id, num_train_epochs, ...).
`predict` answers questions with a saved fine-tune and `export` merges its adapter into the
base model (see `python run.py predict --help`, `python run.py export --help`).
Exit status: 0 on success, 2 on bad data or settings, 3 when the disk or its permissions
refuse to store the run's files, 1 on any other failure, 130 when interrupted (Ctrl-C).
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import yaml
from hamilton import driver, htypes

import finetune_module
from finetune_module.engine import distributed
from finetune_module.engine.files import REPORT_FILE, RunLock, release_directory
from finetune_module.engine.quiet import quiet_libraries

# settings of the CLI and the driver's adapters (the driver config is finetune_module.CONFIG_KEYS)
CONFIG_ONLY = ("dag", "dag_stage", "debug", "cache", "mlflow", "mlflow_experiment")


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


DEFAULT_MODEL_DIR = "finetuned-model/best_model"  # what predict and export read


def _gb_or_none(text: str) -> float | str | None:
    """A number of GB, "auto", or None for "none"."""
    if text.strip().lower() in ("none", "auto"):
        return None if text.strip().lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of GB, auto or none, got {text!r}"
        ) from None


def _speedups(text: str) -> bool | list[str] | None:
    """`auto` (None), `on` (True), `off` (False), or speed-up names separated by commas."""
    switch = {"auto": None, "on": True, "off": False}
    if text.strip().lower() in switch:
        return switch[text.strip().lower()]
    return [name.strip() for name in text.split(",") if name.strip()]


def _key_value(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as YAML (so numbers, booleans and lists keep their type)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _with_escapes(text: str) -> str:
    """The text with `\\n` and `\\t` typed on the command line read as a new line and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per input of the dataflow, Hugging Face names for training."""
    p = argparse.ArgumentParser(
        prog="python run.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only what is given reaches the dataflow
    )
    p.add_argument("--config", help="YAML file of settings (input names as keys); flags win")
    p.add_argument(
        "--start",
        choices=finetune_module.STARTS,
        help="base (train, default) or presaved (evaluate a saved fine-tune)",
    )
    p.add_argument(
        "--dag",
        metavar="PATH",
        help="draw the dataflow to PATH (.png/.svg/.pdf/.dot): one box per stage and the values "
        "that pass between stages; exits after drawing unless --data is given",
    )
    p.add_argument(
        "--dag-stage",
        dest="dag_stage",
        choices=[*finetune_module.STAGE_NAMES, "all"],
        help="with --dag: draw this stage's nodes in full instead (all: every node)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        dest="data_path",
        help="a JSON, JSON Lines, CSV, TSV or Parquet file, a `datasets` directory saved with "
        "save_to_disk, or with --source sql a database URL (sqlite:///qa.db, postgresql://...)",
    )
    g.add_argument(
        "--source",
        choices=finetune_module.SOURCES,
        help="file (default: read --data by its extension) or sql (--data is a SQLAlchemy URL)",
    )
    g.add_argument("--sql-table", dest="sql_table", help="with --source sql: table or view to read")
    g.add_argument(
        "--sql-query",
        dest="sql_query",
        help="with --source sql: a SELECT query instead (run read-only; anything else is refused)",
    )
    g.add_argument(
        "--split-column",
        dest="split_column",
        help="key whose value (train/validation/test) picks each record's set, "
        "instead of --split-strategy",
    )
    g.add_argument(
        "--input-key", dest="input_text_key", help="key of the input text (default: question)"
    )
    g.add_argument(
        "--output-key", dest="output_text_key", help="key of the target text (default: reply)"
    )
    g.add_argument(
        "--split-strategy",
        dest="split_strategy",
        choices=("random", "last"),
        help="random (default) or last: keep file order, hold out the tail",
    )
    g.add_argument(
        "--random-state", dest="random_state", type=int, help="seed of the split (default: 42)"
    )
    g.add_argument(
        "--train-size", dest="train_size", type=float, help="fraction for training (default: 0.95)"
    )
    g.add_argument(
        "--validation-size",
        dest="validation_size",
        type=float,
        help="fraction of the rest for validation, the remainder is hold-out (default: 0.8)",
    )

    g = p.add_argument_group("tokenization")
    g.add_argument(
        "--max-source-length",
        dest="max_source_length",
        type=int,
        help="input cap in tokens (default: the data's 95th percentile)",
    )
    g.add_argument(
        "--max-target-length",
        dest="max_target_length",
        type=int,
        help="target cap in tokens (default: the data's 95th percentile)",
    )
    g.add_argument(
        "--length-percentile",
        dest="length_percentile",
        type=float,
        help="percentile of lengths used for the caps (default: 95)",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model-id",
        dest="model_id",
        help="Hugging Face model id or local directory (default: google/flan-t5-small)",
    )
    g.add_argument(
        "--output-dir",
        dest="output_dir",
        help="where checkpoints and the best model go (default: finetuned-model)",
    )
    g.add_argument(
        "--presaved-model-path",
        dest="presaved_model_path",
        help="with --start "
        "presaved: the adapter directory to load (default: OUTPUT_DIR/best_model)",
    )
    g.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        help="allow code shipped with the model to run",
    )
    g.add_argument("--r", "--lora-r", dest="r", type=int, help="LoRA rank (default: 16)")
    g.add_argument("--lora-alpha", dest="lora_alpha", type=int, help="LoRA scaling (default: 32)")
    g.add_argument(
        "--lora-dropout", dest="lora_dropout", type=float, help="LoRA dropout (default: 0.05)"
    )
    g.add_argument(
        "--target-modules",
        dest="target_modules",
        nargs="+",
        metavar="NAME",
        help="layers to adapt (default: q v for T5, inferred for others)",
    )

    g = p.add_argument_group("training (Hugging Face Seq2SeqTrainingArguments names)")
    for name, kind, default in (
        ("num_train_epochs", float, "2"),
        ("max_steps", int, "-1: use epochs"),
        ("per_device_train_batch_size", int, "8"),
        ("per_device_eval_batch_size", int, "8"),
        ("learning_rate", float, "1e-3"),
        ("gradient_accumulation_steps", int, "1"),
        ("seed", int, "42"),
    ):
        g.add_argument(
            f"--{name}",
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            help=f"default: {default}",
        )
    g.add_argument(
        "--training-arg",
        dest="extra_training_args",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="any other Seq2SeqTrainingArguments field, e.g. warmup_steps=10 (repeatable)",
    )

    g = p.add_argument_group(
        "scaling out (GPU precision and memory, DeepSpeed, FSDP; "
        "several processes come from torchrun or accelerate launch)"
    )
    for name, help_text in (
        ("bf16", "bfloat16 mixed precision (CUDA GPU with bf16 support)"),
        ("fp16", "float16 mixed precision (CUDA GPU)"),
        ("gradient_checkpointing", "recompute activations in the backward pass to save memory"),
        ("load_in_4bit", "QLoRA: 4-bit NF4 base model (CUDA GPU and bitsandbytes)"),
        ("load_in_8bit", "8-bit base model (CUDA GPU and bitsandbytes)"),
        ("fsdp", "shard the model across the processes with PyTorch FSDP (CUDA GPUs)"),
    ):
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])  # unique, in order
        g.add_argument(*flags, dest=name, action="store_true", help=help_text)
    g.add_argument(
        "--activation-memory-gb",
        "--activation_memory_gb",
        dest="activation_memory_gb",
        type=_gb_or_none,
        metavar="GB",
        help="about how much memory a training batch may keep for its backward pass; longer "
        "batches recompute just enough layers to stay within it (default: auto, 4 times the "
        "model's weights; none: no limit, fastest)",
    )
    g.add_argument(
        "--cpu-speedups",
        "--cpu_speedups",
        dest="cpu_speedups",
        type=_speedups,
        metavar="auto|on|off|NAMES",
        help="the CPU speed layer: auto (default: on when the model runs on the CPU), on, off, "
        "or the pieces to apply separated by commas (allocator, fused_gelu, cheap_dropout, "
        "attention_dropout, logit_free_loss, activation_budget); each applies only to the "
        "model families it is proven for",
    )
    g.add_argument("--deepspeed", dest="deepspeed", metavar="JSON", help="DeepSpeed config file")
    g.add_argument(
        "--fsdp_config",
        "--fsdp-config",
        dest="fsdp_config",
        metavar="JSON",
        help="FSDP settings file (with --fsdp)",
    )

    g = p.add_argument_group("model and task kinds")
    g.add_argument(
        "--model-type",
        dest="model_type",
        choices=finetune_module.MODEL_TYPES,
        help="seq2seq (encoder-decoder such as FLAN-T5, default) or causal (decoder-only such "
        "as GPT-2, Llama, Mistral)",
    )
    g.add_argument(
        "--full-finetune",
        "--no-lora",
        dest="use_lora",
        action="store_const",
        const=False,
        help="train every weight and save a full model instead of a LoRA adapter "
        "(use a lower --learning_rate, e.g. 5e-5)",
    )
    g.add_argument(
        "--prompt-template",
        dest="prompt_template",
        type=_with_escapes,
        metavar="TEMPLATE",
        help="the model's input, with {input} and optionally {context}, e.g. "
        "'Context: {context}\\nQuestion: {input}\\nAnswer:' (\\n is a new line; default: {input})",
    )
    g.add_argument(
        "--context-key",
        dest="context_key",
        nargs="+",
        metavar="KEY",
        help="record key(s) of the context (a text or a list of texts) put in {context}",
    )
    g.add_argument(
        "--task",
        dest="task",
        choices=finetune_module.TASKS,
        help="classification adds accuracy and macro-F1 to ROUGE; auto (default) does when the "
        "targets are at most 20 labels, each seen twice or more",
    )

    g = p.add_argument_group("resuming")
    g.add_argument(
        "--resume_from_checkpoint",
        "--resume-from-checkpoint",
        "--resume",
        dest="resume_from_checkpoint",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue a killed run from the last complete checkpoint in OUTPUT_DIR/checkpoints, "
        "or from the checkpoint-N folder given",
    )
    g.add_argument(
        "--init-adapter-path",
        dest="init_adapter_path",
        metavar="DIR",
        help="with --start base: continue training this saved adapter (a best_model or "
        "checkpoint-N folder) instead of a fresh LoRA",
    )

    g = p.add_argument_group("generation")
    g.add_argument("--num-beams", dest="num_beams", type=int, help="1 = greedy (default)")
    g.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        help="answer length bound (default: the target cap)",
    )
    g.add_argument(
        "--generation-batch-size",
        dest="generation_batch_size",
        type=int,
        help="questions answered at once (default: 32)",
    )

    g = p.add_argument_group("caching and tracking")
    g.add_argument(
        "--cache",
        nargs="?",
        const=".hamilton_cache",
        metavar="DIR",
        help="Hamilton's cache in DIR (default .hamilton_cache): a re-run with the same data, "
        "model and training settings re-uses the tokenized data and the trained adapter",
    )
    g.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="TRACKING_URI",
        help="log params, metrics and the saved model to MLflow (default store: ./mlruns)",
    )
    g.add_argument(
        "--mlflow-experiment",
        dest="mlflow_experiment",
        help="MLflow experiment name (default: finetune)",
    )

    g = p.add_argument_group("progress")
    g.add_argument(
        "--quiet",
        dest="quiet",
        action="store_true",
        help="only the summary and errors: no progress bars (DAG nodes, training, generation, "
        "loading weights), no log lines, no library warnings; for CI and log files",
    )
    return p


def _adapters(cli: dict[str, Any]) -> list[Any]:
    """The driver adapters the command line asks for: MLflow tracking with --mlflow."""
    if "mlflow" not in cli:
        return []
    from finetune_module.tracking import DEFAULT_EXPERIMENT, mlflow_tracker

    experiment = cli.get("mlflow_experiment") or DEFAULT_EXPERIMENT
    return [mlflow_tracker(cli["mlflow"] or None, experiment)]


def _print_cache_use(dr: Any, cache_dir: str) -> None:
    """Which results the run took from the cache and which it computed."""
    from hamilton.caching.adapter import CachingEventType

    logs = dr.cache.logs(dr.cache.last_run_id, level="debug")
    taken = sorted(
        name
        for name, events in logs.items()
        if any(e.event_type == CachingEventType.GET_RESULT for e in events)
    )
    computed = sorted(
        name
        for name, events in logs.items()
        if any(e.event_type == CachingEventType.EXECUTE_NODE for e in events)
    )
    print(f"Cache {cache_dir}: re-used {len(taken)} results ({', '.join(taken) or 'none'})")
    print(f"  computed {len(computed)} ({', '.join(computed)})")


def settings_from(argv: list[str]) -> dict[str, Any]:
    """The run's settings: the --config file's, overridden by the flags given."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    settings: dict[str, Any] = {}
    if "config" in flags:
        config_path = flags.pop("config")
        try:
            with open(config_path, encoding="utf-8") as f:
                settings = yaml.safe_load(f) or {}
        except OSError as e:
            raise finetune_module.SettingsError(
                f"--config {config_path}: cannot be read ({e.strerror})."
            ) from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise finetune_module.SettingsError(
                f"--config {config_path}: not valid YAML ({' '.join(str(e).split())})."
            ) from e
        if not isinstance(settings, dict):
            raise finetune_module.SettingsError(
                f"--config {config_path}: must hold a mapping of input names to values."
            )
        known = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise finetune_module.SettingsError(
                f"Unknown settings in the config file: {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(known))}."
            )
    if "extra_training_args" in flags:
        flags["extra_training_args"] = {
            **settings.get("extra_training_args", {}),
            **dict(flags["extra_training_args"]),
        }
    settings.update(flags)
    return settings


def _check_types(dr: driver.Driver, settings: dict[str, Any]) -> None:
    """Refuses settings whose type does not fit the dataflow's input, one line per setting."""
    types = {v.name: v.type for v in dr.list_available_variables() if v.is_external_input}
    wrong = []
    for name, value in settings.items():
        if name in types and not htypes.check_input_type(types[name], value):
            hint = ""
            if isinstance(value, str) and _is_number(value):
                hint = " (YAML reads numbers like 1e-3 as text: write 0.001 or 1.0e-3)"
            expected = getattr(types[name], "__name__", str(types[name])).replace("typing.", "")
            wrong.append(f"{name} must be {expected}, got {value!r}{hint}")
    if wrong:
        raise finetune_module.SettingsError("; ".join(wrong) + ".")


def _is_number(text: str) -> bool:
    """Whether the text spells a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _print_summary(result: dict[str, Any], start: str, seconds: float) -> None:
    """A short account of the run: metrics, a few answers, where the files went."""
    metrics = result["training_and_validation_set_metrics"]
    print(f"\nDone in {seconds:.1f} s ({start}).")
    shown = [
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
    ]
    for key in shown:
        if metrics.get(key) is not None:
            print(f"  {key:26s} {metrics[key]:.4f}")
    predictions = result["hold_out_set_predictions"]
    print(f"Hold-out answers ({len(predictions)}):")
    for question, prediction, _ in predictions[:3]:
        print(f"  Q: {question[:90]}\n  A: {prediction[:90]}")
    print(f"Saved to: {result['save_best_models']}")
    print(f"Report: {os.path.join(result['save_best_models'], REPORT_FILE)}")


def _library_logging() -> None:
    """Library log lines go through the root handler only, masked like the rest: huggingface_hub
    (and transformers under CI) has a handler of its own and also passes its lines on to the
    root, which printed each of them twice. The hub's HTTP client logs no line per request."""
    for name in ("huggingface_hub", "transformers"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    logging.getLogger("httpx2").setLevel(logging.WARNING)


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


def progress_adapters(quiet: bool) -> list[Any]:
    """Hamilton's progress bar over the DAG's nodes, shown on a terminal by the main process
    unless `quiet` (in a log or a pipe its redrawn line would only be noise, ahead of the
    one-line error a bad input gets)."""
    if quiet or not sys.stderr.isatty() or not distributed.is_main_process():
        return []
    from hamilton.plugins import h_tqdm

    return [h_tqdm.ProgressBar(desc="finetune")]


def _common_flags(p: argparse.ArgumentParser) -> None:
    """The flags that `predict` and `export` share: the saved model and how to load it."""
    p.add_argument(
        "--model-dir",
        default=DEFAULT_MODEL_DIR,
        help=f"the saved fine-tune: a best_model/ or checkpoint directory (default: "
        f"{DEFAULT_MODEL_DIR}); predict also takes an exported model",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow code shipped with the model to run"
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars, log lines or library warnings"
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_predict_parser() -> argparse.ArgumentParser:
    """`run.py predict`: answer questions with a saved fine-tune."""
    p = argparse.ArgumentParser(
        prog="python run.py predict",
        description="Answer questions with a saved fine-tune (batched, greedy by default). "
        "Prints one answer per line, in the order of the questions (positional ones first, "
        "then those of --file).",
    )
    p.add_argument("questions", nargs="*", help="questions to answer")
    p.add_argument(
        "--file",
        help="more questions: records holding --input-key in a .json list (or plain strings), "
        ".jsonl, .csv, .tsv or .parquet file; any other file is read as one question per line",
    )
    p.add_argument("--input-key", default="question", help="key of the question in --file records")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default)")
    p.add_argument(
        "--max-new-tokens", type=int, help="answer length bound (default: the saved one)"
    )
    p.add_argument(
        "--batch-size", type=int, help="questions answered at once (default: the saved one)"
    )
    p.add_argument(
        "--jsonl",
        action="store_true",
        help='print JSON Lines {"question": ..., "prediction": ...} instead of bare answers',
    )
    _common_flags(p)
    return p


def build_export_parser() -> argparse.ArgumentParser:
    """`run.py export`: merge a saved adapter into its base model."""
    p = argparse.ArgumentParser(
        prog="python run.py export",
        description="Merge a saved LoRA adapter into its base model and save a plain "
        "AutoModelForSeq2SeqLM directory (safetensors, tokenizer, finetune_settings.json) "
        "that loads without peft.",
    )
    p.add_argument("--to", dest="export_dir", required=True, help="directory for the merged model")
    _common_flags(p)
    return p


def _predict(argv: list[str]) -> int:
    """`run.py predict`: prints the saved fine-tune's answers."""
    args = build_predict_parser().parse_args(argv)
    questions = list(args.questions)
    if args.file:
        questions += finetune_module.read_texts(args.file, args.input_key)
    if not questions:
        raise finetune_module.SettingsError("Give questions to answer, or --file.")
    with _quiet_output(args.quiet):
        answers = finetune_module.predict(
            args.model_dir,
            questions,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            trust_remote_code=args.trust_remote_code,
            quiet=args.quiet,
        )
    for question, answer in zip(questions, answers, strict=True):
        if args.jsonl:
            print(json.dumps({"question": question, "prediction": answer}, ensure_ascii=False))
        else:
            print(" ".join(answer.splitlines()))
    return 0


def _export(argv: list[str]) -> int:
    """`run.py export`: writes the merged model."""
    args = build_export_parser().parse_args(argv)
    with _quiet_output(args.quiet):
        path = finetune_module.export_merged(
            args.model_dir,
            args.export_dir,
            trust_remote_code=args.trust_remote_code,
            quiet=args.quiet,
        )
    print(f"Exported the merged model to {path}")
    return 0


COMMANDS = {"predict": _predict, "export": _export}


def main(argv: list[str] | None = None) -> int:
    """Runs the dataflow with the settings of the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_MaskCredentials())
    _library_logging()
    logging.getLogger("hamilton").setLevel(logging.WARNING if debug else logging.CRITICAL)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        settings = settings_from(argv)
        cli = {name: settings.pop(name) for name in CONFIG_ONLY if name in settings}
        start = settings.pop("start", "base")
        dag_path = cli.get("dag")
        config = {k: settings.pop(k) for k in finetune_module.CONFIG_KEYS[1:] if k in settings}
        config.setdefault("source", "file")  # named in the DAG picture and MLflow params
        quiet = settings.get("quiet", False)
        adapters = [*_adapters(cli), *progress_adapters(quiet)]
        dr = finetune_module.build_driver(
            start, cache=cli.get("cache"), adapters=adapters, **config
        )
        if dag_path:
            finetune_module.draw_dag(dr, dag_path, cli.get("dag_stage"))
            print(f"Drew the dataflow ({start}) to {dag_path}")
            if "data_path" not in settings:
                return 0
        if "data_path" not in settings:
            raise finetune_module.SettingsError("--data (or data_path in --config) is required.")
        settings.setdefault("input_text_key", "question")
        settings.setdefault("output_text_key", "reply")
        outputs = list(finetune_module.DEFAULT_OUTPUTS)
        _check_types(dr, settings)
        try:  # anything else Hamilton would refuse, before anything runs
            dr.validate_execution(outputs, inputs=settings)
        except ValueError as e:
            raise finetune_module.SettingsError(" ".join(str(e).split())) from e
        # the run's directory is taken before anything runs: a second run into it stops at once
        output_dir = settings.get("output_dir", finetune_module.settings.DEFAULT_OUTPUT_DIR)
        lock = RunLock(output_dir, hold=distributed.is_main_process())  # until the run ends
        began = time.perf_counter()
        try:
            with _quiet_output(quiet):
                result = dr.execute(outputs, inputs=settings)
        finally:  # success or failure: this process's runs in the directory are over
            release_directory(output_dir)
            del lock
        if distributed.is_main_process():
            _print_summary(result, start, time.perf_counter() - began)
            if cli.get("cache"):
                _print_cache_use(dr, cli["cache"])
        distributed.end()
        return 0
    except finetune_module.FinetuneInputError as e:
        if debug:
            raise
        print(f"error: {finetune_module.mask_credentials(str(e))}", file=sys.stderr)
        return 2
    except finetune_module.StorageError as e:  # the disk or its permissions refused a write
        if debug:
            raise
        print(f"error: {finetune_module.mask_credentials(e.strerror or str(e))}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            "error: interrupted. Saved models are complete or untouched; run again with "
            "--resume_from_checkpoint to continue training from the last checkpoint.",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        if debug:
            raise
        message = finetune_module.mask_credentials(f"{type(e).__name__}: {e}")
        print(f"error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
