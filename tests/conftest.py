import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# torch reads OMP_NUM_THREADS at import; without it, at most two threads (the tests' models are tiny).
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def configured_threads():
    """Every test starts with the configured thread count (a command run in-process with --threads
    changes it for the whole process)."""
    torch.set_num_threads(THREADS)
    yield


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "float_kernels: the verdict compares float results of torch's CPU kernels with a tolerance "
        "or across two computations; .ci/run runs these tests again under other kernel sets "
        "(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and thread counts")


def pytest_report_header(config):
    """The float kernels and the thread count the verdicts below were computed with."""
    return f"torch {torch.__version__}: {THREADS} threads, CPU kernels {torch.backends.cpu.get_cpu_capability()}"
