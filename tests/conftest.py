"""Shared fixtures: a tiny local T5 and one real run of the dataflow, all offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach for the hub
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from hamilton import driver

import finetune_module
from finetune_module.engine import mkl_kernels
from finetune_module.tiny_model import Sizes, build, build_t5, texts_of

# MKL's kernels as a fresh run of the dataflow takes them, before any test's first product: a
# test that compares a run in a process of its own (the command) with one in this process to
# the bit needs both on the same kernels (their sums round alike). Where they do not apply
# (not an AMD processor with AVX-512), MKL's own choice holds in both.
mkl_kernels.use_avx512_kernels()

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = REPO / "example-support-dataset.json"

# Small and fast: one layer each side, d_model 32 (a training step takes milliseconds).
TINY = {"vocab_size": 400, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64}


def run_dag(
    start: str, *, source: str = "file", adapters: tuple[Any, ...] = (), **inputs: Any
) -> dict[str, Any]:
    """Runs the dataflow the way a user's run file does (with the driver `adapters` given),
    and returns the four outputs."""
    builder = (
        driver.Builder()
        .with_config({"start": start, "source": source})
        .with_modules(*finetune_module.MODULES)
    )
    dr = builder.with_adapters(*adapters).build() if adapters else builder.build()
    base_inputs = {"input_text_key": "question", "output_text_key": "reply"}
    return dr.execute(list(finetune_module.DEFAULT_OUTPUTS), inputs={**base_inputs, **inputs})


def data_stage(source: str = "file", **inputs: Any) -> dict[str, Any]:
    """The data stage's outputs (and the tokenized training set) for a source, from the driver."""
    dr = (
        driver.Builder()
        .with_config({"start": "base", "source": source})
        .with_modules(*finetune_module.MODULES)
        .build()
    )
    nodes = ["qa_table", "train_set", "validation_set", "hold_out_set", "tokenized_train"]
    base_inputs = {"input_text_key": "question", "output_text_key": "reply"}
    return dr.execute(nodes, inputs={**base_inputs, **inputs})


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The example dataset shipped with the project."""
    return EXAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 with a tokenizer trained on the example dataset, saved to disk."""
    path = tmp_path_factory.mktemp("tiny-t5")
    build_t5(str(path), texts_of(str(EXAMPLE_DATA)), **TINY)
    return path


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds a tiny model of a family (`tiny_model.FAMILIES`) with its own kind of tokenizer
    trained on the example data, once per session; returns its directory."""
    built: dict[str, Path] = {}

    def family_dir(family: str) -> Path:
        if family not in built:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build(str(path), texts_of(str(EXAMPLE_DATA)), family, Sizes(**TINY))
            built[family] = path
        return built[family]

    return family_dir


@pytest.fixture(scope="session")
def base_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fine-tune of the tiny model on the example data, timed by the stage timer (the
    adapter a user adds for the stage times in the report): its inputs, outputs and files."""
    output_dir = tmp_path_factory.mktemp("run")
    inputs = {
        "data_path": str(EXAMPLE_DATA),
        "model_id": str(tiny_model_dir),
        "output_dir": str(output_dir),
        "num_train_epochs": 2,
        "learning_rate": 5e-3,
    }
    result = run_dag("base", adapters=(finetune_module.timing_adapter(),), **inputs)
    return {"inputs": inputs, "result": result, "output_dir": output_dir}


# A test of the CPU speed layer inside a real run: on a machine with a GPU the run trains there,
# where the layer is off unless asked for (settings.speedups_requested), so it has nothing to see.
cpu_path_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the run trains on the GPU here, where the CPU speed layer is off by default",
)

# a short fine-tune for tests that need a trained model but not a good one
QUICK = {"max_steps": 2, "max_new_tokens": 4}


def read_json(path: Path) -> Any:
    """The JSON value in a file."""
    return json.loads(path.read_text(encoding="utf-8"))


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """The environment of a run that may reach the hub: HF_HUB_OFFLINE unset, the hub at
    `endpoint`, an empty Hugging Face cache in `home`."""
    unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(home)}


class SilentHub:
    """A hub endpoint that accepts connections, reads each request's first line and never
    answers (a hub behind a firewall that drops, or a proxy that hangs): `url`, and `requests`,
    the request lines it has taken ("HEAD / HTTP/1.1", ...)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self._taken: list[socket.socket] = []
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection = self._server.accept()[0]
            except TimeoutError:
                continue
            self._taken.append(connection)
            connection.settimeout(2)
            try:
                self.requests.append(connection.recv(4096).decode("latin-1").split("\r\n")[0])
            except TimeoutError:
                self.requests.append("")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for connection in [*self._taken, self._server]:
            connection.close()


@pytest.fixture
def silent_hub() -> Iterator[SilentHub]:
    """A hub endpoint that never answers."""
    hub = SilentHub()
    yield hub
    hub.close()


class _Unavailable(BaseHTTPRequestHandler):
    """Answers its root (the hub's front page) and 503 "try again now" to everything else."""

    def _answer(self) -> None:
        self.send_response(200 if self.path == "/" else 503)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def failing_hub() -> Iterator[str]:
    """The URL of a hub endpoint that answers, but fails every request for a model (503), so
    that huggingface_hub retries and logs each retry."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
