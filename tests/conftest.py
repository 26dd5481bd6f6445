"""Shared fixtures and markers.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here (the
first thing pytest imports) whenever no CUDA device is present.

Without a GPU, tests whose id names Triton run under the interpreter and count as ``slow``: the
full run (``python -m pytest``) runs them, ``-m "not slow"`` (the quick development pass) skips them.

The compiled FlexAttention CPU path (``dam.kernels.cpu_flex``) is off unless a test turns it on
(``tests/kernels/test_cpu_flex.py``): elsewhere the tests pin the ATen path, and no test starts a
background compiler build.
"""

from __future__ import annotations

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["DAM_CPU_FLEX"] = "0"

requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("requires_cuda") and not _HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        # Triton kernels without a GPU run under the interpreter: slow (the full run keeps them)
        if not _HAS_CUDA and "triton" in item.nodeid.lower():
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Fresh but reproducible randomness per test (seeded from the test's name)."""
    import random
    import zlib

    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()) & 0xFFFF
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)
    yield


@pytest.fixture(scope="session")
def dam_cache(tmp_path_factory):
    """The DAM cache root the tests use (the user's DAM_CACHE if set, so the converted
    SmolLM2 is reused across runs; otherwise ~/.cache/dam)."""
    return os.environ.get("DAM_CACHE", os.path.expanduser("~/.cache/dam"))


@pytest.fixture(scope="session")
def tokenizer_dir(dam_cache):
    """The converted SmolLM2 directory (its tokenizer, for tiny models fed real text)."""
    os.environ["DAM_CACHE"] = dam_cache
    from dam.profiler import load_model
    from dam.profiler.models import converted_dir

    d = converted_dir("smollm2-135m")
    if not (d / "tokenizer.json").is_file():
        load_model("smollm2-135m")
    return str(d)
