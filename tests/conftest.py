"""Test setup. Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter:
TRITON_INTERPRET must be set before Triton is first imported, hence here. Shared helpers are in
tests/helpers.py.

Every test starts from a fixed seed (0), so a failure replays as it was; `pytest --seed random`
draws a fresh one per test and `--seed N` replays it: a failing test's output shows its seed."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The chunk's logits through the opt-in Triton matmul with statistics (kernels/logits.py), so
    # that every Triton-backend test covers it here; test_matmul also runs the cuBLAS route, and
    # the GPU runs the default (cuBLAS) route.
    os.environ.setdefault("FUSED_CEL_MATMUL", "triton")


def pytest_addoption(parser):
    parser.addoption("--seed", default="0", help="torch seed of every test: an int (default 0), or 'random'")


def _draw(config) -> int:
    given = config.getoption("--seed")
    seed = int.from_bytes(os.urandom(4), "little") if given == "random" else int(given)
    print(f"seed {seed}: replay with pytest --seed {seed}")
    return seed


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's seed, already given to torch.manual_seed."""
    value = _draw(request.config)
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="module")
def module_seed(request) -> int:
    """A seed for a module-scoped fixture's inputs."""
    return _draw(request.config)


@pytest.fixture
def one_thread():
    """One torch thread for tiny matmuls (training runs of a tiny model): on a loaded CPU several
    spin against each other. Modules take it with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts a patched model's calls into fused_cel.linear_cross_entropy (a list of the hidden
    states' shapes, for its length)."""
    from fused_cel.integrations import hf

    calls = []
    linear_cross_entropy = hf.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return linear_cross_entropy(*args, **kwargs)

    monkeypatch.setattr(hf, "linear_cross_entropy", counting)
    return calls
