import importlib.util
import os

import pytest
import torch

from tests.digits import SharedRuns

# The device the op tests put their tensors on: CUDA where there is a GPU (then the cuda
# and Triton backends are tested), else the CPU, where Triton kernels run in its
# interpreter. TWA_TEST_DEVICE=cpu|cuda overrides.
DEVICE = torch.device(os.environ.get("TWA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
HAS_TRITON = importlib.util.find_spec("triton") is not None
if DEVICE.type == "cpu" and HAS_TRITON:
    # Must be set before the Triton kernels are defined (twa_kernels imports them lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Backends that must agree with the reference on DEVICE.
if DEVICE.type == "cuda":
    BACKENDS = ["cuda", "triton"]
else:
    BACKENDS = ["cpp"] + (["triton"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])


# Under pytest-xdist the workers share the machine's cores: each takes its share of them,
# for torch's own threads and for the processes the tests start, so that two workers on two
# cores do not each run two threads (oversubscribed OpenMP threads spin against each other).
# A test that needs a given thread count sets it itself.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module of tiny models and batches (use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): a second thread is no faster
    there, and can be starved by oversubscription on a busy shared machine. The thread
    count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=BACKENDS)
def backend_name(request, monkeypatch):
    """Forces the backend under test for the duration of one test."""
    monkeypatch.setenv("TWA_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def device() -> torch.device:
    """Where the op tests put their tensors (see DEVICE)."""
    return DEVICE



@pytest.fixture(scope="session")
def digits_checkpoints() -> SharedRuns:
    """digits_checkpoints(epochs, lr=0.05, seed=0): the state_dicts after each epoch of SGD on
    the digits training split (tests.digits.train_checkpoints), each run trained once per pytest run."""
    return SharedRuns()
