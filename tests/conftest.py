import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.  The variable is
# read when a kernel module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two that
# wait for each other (and for DataLoader workers and other processes). Subprocesses the tests
# start set the same (tests/faults.py, tests/ring_cases.py).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """The token cache of every test run lives in a temporary directory, never in ~/.cache."""
    os.environ["RETRIEVER_CACHE"] = str(tmp_path_factory.mktemp("retriever-cache"))


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state is reset after the test, so that the next test's Trainer
    (another config, another precision) starts afresh. Modules that build Trainers use it for
    every test: ``pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")``."""
    yield
    from train_helpers import reset_accelerate_state

    reset_accelerate_state()
