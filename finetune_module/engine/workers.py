"""Training steps on worker threads: a step's rows go forward and backward on two threads at
once, each running torch on its share of the cores.

torch runs each operation on all its threads (OpenMP), and both cores wait at the end of
every one: a training step of T5 is thousands of operations, many of them small (norms,
dropout, the LoRA layers' products of 16 columns) or run by Python between two others, where
one core works and the other waits. Two threads that each train on half of the batch's rows,
with torch on one core each, keep both cores busy: on this project's 2-core machine one
epoch's 48 batches of the benchmark took 3.8% less time (80.7 -> 77.6 s, in one process,
alternately step by step through `FinetuneTrainer.training_step`), most of it on the long
batches. Both workers hold their temporaries at once: the benchmark's peak went from 2.09-2.14
to 2.26-2.27 GB.

The gradients are the batch's, as the parts of `memory.ActivationBudget` give them: each
worker's rows go in parts within its share of the activation budget, each part's loss scaled
by its share of the batch's tokens; each worker sums its own parts' gradients, and the sum
over the workers, in a fixed order, is added to the weights' gradients (the same result
whichever thread ends first). Each worker draws its dropout masks from a generator of its
own (`speedups.dropout_generator`), seeded from torch's default generator in the workers'
order, so that a seeded run gives the same masks, and weights, every time.
"""

import concurrent.futures
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from finetune_module.engine import speedups

#: Threads that share a step (and the cores between them); more were not measured.
WORKERS = 2

T = TypeVar("T")

_POOL_LOCK = threading.Lock()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that run the workers besides the calling one, kept for the process (a new
    thread would also get a new allocator arena from glibc at every step)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(
                max_workers=WORKERS - 1, thread_name_prefix="finetune-worker"
            )
        return _POOL


def worker_count(device: torch.device) -> int:
    """How many threads share a training step on `device`: `WORKERS` on a CPU where torch
    runs on at least as many threads, else 1."""
    threads = torch.get_num_threads()
    return WORKERS if device.type == "cpu" and threads >= WORKERS else 1


@contextlib.contextmanager
def cores_shared(workers: int) -> Iterator[int]:
    """Within the block torch runs each operation of the calling thread on its share of the
    threads it had (at least one; yielded), so that `workers` threads at once use each core
    once; restored after. (torch's OpenMP and MKL thread counts are each thread's own: a
    worker thread sets its own, `run_at_once`.)"""
    threads = torch.get_num_threads()
    share = max(1, threads // workers)
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        torch.set_num_threads(threads)


def run_at_once(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Runs the jobs at once, the first on the calling thread and the others on the pool's,
    each in a copy of the caller's context and with a dropout generator of its own (seeded
    from torch's default generator, in the jobs' order, before any starts); returns their
    results in the jobs' order. Within it torch shares the cores between them
    (`cores_shared`). A job's exception is raised once every job has ended."""
    seeds = [int(torch.empty((), dtype=torch.int64).random_()) for _ in jobs]

    def seeded(job: Callable[[], T], seed: int, threads: int) -> Callable[[], T]:
        def run() -> T:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            generator = torch.Generator().manual_seed(seed)
            with speedups.dropout_generator(generator):
                return job()

        return run

    with cores_shared(len(jobs)) as share:
        tasks = [seeded(job, seed, share) for job, seed in zip(jobs, seeds, strict=True)]
        pool = _pool()
        futures = [pool.submit(contextvars.copy_context().run, task) for task in tasks[1:]]
        try:
            first = contextvars.copy_context().run(tasks[0])
        finally:
            concurrent.futures.wait(futures)
    return [first, *(future.result() for future in futures)]


#: Steps are shared only where the weights that train are at most this share of the model's:
#: each worker holds a gradient of its own for each of them (an adapter's: a few MB).
TRAINED_SHARE = 0.125


def few_weights_train(model: torch.nn.Module) -> bool:
    """Whether the weights of `model` that train are few enough for each worker to hold its
    own gradients (`TRAINED_SHARE` of the model's at most: an adapter, not a full
    fine-tune)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in trained_weights(model)) <= TRAINED_SHARE * total


def summed_gradients(
    per_worker: Sequence[Sequence[torch.Tensor | None]],
) -> list[torch.Tensor | None]:
    """Each weight's gradients from the workers added up in the workers' order (None where
    no worker has one); the gradients given are left as they are."""
    out: list[torch.Tensor | None] = []
    for grads in zip(*per_worker, strict=True):
        present = [g for g in grads if g is not None]
        out.append(functools.reduce(torch.add, present) if present else None)
    return out


def add_gradients(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Adds `grads` to the weights' gradients, as a backward pass would (sets them where
    there are none yet)."""
    for weight, grad in zip(weights, grads, strict=True):
        if grad is None:
            continue
        if weight.grad is None:
            weight.grad = grad
        else:
            weight.grad += grad


def trained_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The model's weights that train."""
    return [p for p in model.parameters() if p.requires_grad]
