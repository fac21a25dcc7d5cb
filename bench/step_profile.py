"""Where a training step's time goes: matrix multiplications against everything else.

    python -m bench.step_profile                # flan-t5-small's shape, the benchmark's data
    python -m bench.step_profile --quick        # a tiny model: checks the profile itself runs

It runs the real dataflow's training (the benchmark's model, data and batch size 8, with the
speed layer as configured) for a few warm-up steps, times `--steps` steps, then records the
same number of steps under torch's profiler and splits their CPU time into

- the matrix multiplications (`mm`, `bmm`, `addmm`, ...), with the FLOPs the profiler counts
  for them and the GFLOP/s they run at, per operand shape;
- every other operation, by name (elementwise passes, copies, softmax, random numbers, the
  optimizer, ...).

The machine's matmul peak is measured in the same run, as the benchmark measures it. From these
follow the bounds that matter for the speed goals: the step's time if everything but its
matmuls took no time at all, and if its matmuls also ran at the peak. Figures go to JSON
(`--out`).

The page faults and the system time of the timed steps and of the profiled ones are given too:
the profiler's own records, allocated between the step's tensors, can keep the allocator from
reusing the large blocks the step frees, so that each large tensor of the profiled steps is
taken from fresh pages. On a machine where a page fault is costly that time lands in the
operation that first writes the tensor (a `bmm` of the longest texts' attention scores ran at
8 GFLOP/s profiled, 60 GFLOP/s timed alone), and the profile overstates it: compare the two
rows before trusting an operation's share.
"""

import argparse
import collections
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hamilton import driver
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

import finetune_module
from bench.benchmark import aligned, bench_parser, matmul_gflops, prepare, shown
from finetune_module.engine.trainer import trainer_callbacks

# torch operations that multiply matrices (their self time is the BLAS kernel's)
MATMULS = frozenset(
    {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mv"}
)


class _StepWindow(TrainerCallback):
    """Times steps `warmup`..`warmup + steps` (unprofiled), then records the next `steps` steps
    under torch's profiler."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.timed_from: float | None = None
        self.timed_seconds = 0.0
        self.profiled_seconds = 0.0
        self.profiler: profile | None = None
        self._profiled_from = 0.0
        # (page faults, system seconds) of the timed steps and of the profiled steps
        self.timed_usage = self.profiled_usage = (0, 0.0)
        self._usage_from: resource.struct_rusage | None = None

    def _usage_since(self) -> tuple[int, float]:
        """The process's minor page faults and system seconds since `_usage_from`."""
        now, then = resource.getrusage(resource.RUSAGE_SELF), self._usage_from
        assert then is not None
        return now.ru_minflt - then.ru_minflt, now.ru_stime - then.ru_stime

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Starts the clock, then the profiler, at their first step."""
        if state.global_step == self.warmup:
            self._usage_from = resource.getrusage(resource.RUSAGE_SELF)
            self.timed_from = time.perf_counter()
        elif state.global_step == self.warmup + self.steps:
            self.profiler = profile(
                activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True
            )
            self.profiler.__enter__()
            self._usage_from = resource.getrusage(resource.RUSAGE_SELF)
            self._profiled_from = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Stops the clock, then the profiler, after their last step."""
        if state.global_step == self.warmup + self.steps and self.timed_from is not None:
            self.timed_seconds = time.perf_counter() - self.timed_from
            self.timed_usage = self._usage_since()
        elif state.global_step == self.warmup + 2 * self.steps and self.profiler is not None:
            self.profiled_seconds = time.perf_counter() - self._profiled_from
            self.profiled_usage = self._usage_since()
            self.profiler.__exit__(None, None, None)


def split(profiler: profile, steps: int) -> dict[str, Any]:
    """The profiled steps' CPU time per step: matmuls (seconds, GFLOP, GFLOP/s; the shapes
    that take most of it) and every other operation by name."""
    matmul_seconds = matmul_flops = other_seconds = 0.0
    others: dict[str, float] = collections.Counter()
    shapes: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for event in profiler.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6 / steps
        if event.key in MATMULS:
            flops = (event.flops or 0) / steps
            matmul_seconds += seconds
            matmul_flops += flops
            row = shapes[f"{event.key} {event.input_shapes}"]
            row[0] += seconds
            row[1] += flops
            row[2] += event.count / steps
        else:
            other_seconds += seconds
            others[event.key] += seconds
    top_shapes = sorted(shapes.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "matmul_seconds": matmul_seconds,
        "matmul_gflop": matmul_flops / 1e9,
        "matmul_gflops": matmul_flops / 1e9 / matmul_seconds if matmul_seconds else 0.0,
        "other_seconds": other_seconds,
        "other_ops": dict(sorted(others.items(), key=lambda kv: -kv[1])[:15]),
        "matmul_shapes": [
            {"op": key, "seconds": s, "gflops": f / 1e9 / s if s else 0.0, "calls": n}
            for key, (s, f, n) in top_shapes
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Trains on the benchmark's model and data for warm-up, timed and profiled steps; returns
    the figures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-profile-"))
    data_path, model_dir = prepare(work, args.quick, args.records)
    peak = matmul_gflops(n=512 if args.quick else 2048)
    window = _StepWindow(args.warmup, args.steps)
    dr = driver.Builder().with_config({"start": "base"}).with_modules(*finetune_module.MODULES)
    inputs = {
        "data_path": str(data_path),
        "input_text_key": "question",
        "output_text_key": "reply",
        "model_id": str(model_dir),
        "output_dir": str(work / "run"),
        "per_device_train_batch_size": 8,
        "max_steps": args.warmup + 2 * args.steps,
        "extra_training_args": {"disable_tqdm": True, "logging_strategy": "no"},
    }
    with trainer_callbacks([window]):
        dr.build().execute(["fitted_weights"], inputs=inputs)
    if window.profiler is None or not window.profiled_seconds:
        raise SystemExit("training ended before the profiled steps")
    figures = split(window.profiler, args.steps)
    step = window.timed_seconds / args.steps
    profiled_total = figures["matmul_seconds"] + figures["other_seconds"]
    matmul_share = figures["matmul_seconds"] / profiled_total
    figures.update(
        {
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "step_seconds": step,
            "profiled_step_seconds": window.profiled_seconds / args.steps,
            # the whole process's, per step: page faults, and the system time they mostly are
            "page_faults_per_step": window.timed_usage[0] / args.steps,
            "system_seconds_per_step": window.timed_usage[1] / args.steps,
            "profiled_page_faults_per_step": window.profiled_usage[0] / args.steps,
            "profiled_system_seconds_per_step": window.profiled_usage[1] / args.steps,
            "matmul_peak_gflops": peak,
            "matmul_time_share": matmul_share,
            # the step with nothing but its matmuls, at the speed they ran, and at the peak
            "step_seconds_matmuls_only": step * matmul_share,
            "step_seconds_matmuls_at_peak": figures["matmul_gflop"] / peak,
        }
    )
    return figures


def _table(f: dict[str, Any]) -> str:
    """The figures as text."""
    rows = [
        ("threads", str(f["threads"])),
        ("step (unprofiled)", f"{f['step_seconds']:.3f} s"),
        ("step (profiled)", f"{f['profiled_step_seconds']:.3f} s"),
        (
            "page faults a step",
            f"{f['page_faults_per_step']:,.0f} "
            f"(profiled: {f['profiled_page_faults_per_step']:,.0f})",
        ),
        (
            "system time a step",
            f"{f['system_seconds_per_step']:.3f} s "
            f"(profiled: {f['profiled_system_seconds_per_step']:.3f} s)",
        ),
        ("matmul share of CPU time", f"{100 * f['matmul_time_share']:.0f}%"),
        (
            "matmuls",
            f"{f['matmul_gflop']:.1f} GFLOP a step at {f['matmul_gflops']:.1f} GFLOP/s "
            f"(peak {f['matmul_peak_gflops']:.1f})",
        ),
        ("step, matmuls only", f"{f['step_seconds_matmuls_only']:.3f} s"),
        ("step, matmuls only, at peak", f"{f['step_seconds_matmuls_at_peak']:.3f} s"),
    ]
    others = [(f"  {name}", f"{s * 1000:.1f} ms") for name, s in f["other_ops"].items()]
    shapes = [
        (f"  {row['op']}", f"{row['seconds'] * 1000:.1f} ms  {row['gflops']:.1f} GFLOP/s")
        for row in f["matmul_shapes"]
    ]
    return "\n".join(
        [
            aligned(rows),
            "\nother operations, CPU time per step:",
            aligned(others),
            "\nmatmul shapes, CPU time per step:",
            aligned(shapes),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command line of the step profile."""
    p = bench_parser(
        "bench.step_profile",
        __doc__.split("\n\n")[0],
        40,
        "a tiny model instead of flan-t5-small's shape",
        "step_profile.json",
    )
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (%(default)s)")
    p.add_argument("--steps", type=int, default=8, help="timed, then profiled (%(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    args.records = args.records or (40 if args.quick else 400)
    figures = run(args)
    shown(_table(figures), figures, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
