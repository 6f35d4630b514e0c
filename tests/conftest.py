"""Test setup: without a GPU, kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (its decorators read it), so this runs
before any test module imports gradkernels.
"""

import atexit
import os
import shutil
import sys
import tempfile

import torch

# A private Inductor cache per test session: the shared default (/tmp/torchinductor_<user>) can hold
# graphs compiled against another checkout's custom-op schemas, which its cache key does not cover.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradkernels-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

if not torch.cuda.is_available():
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1"
    )
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs a fixed sequence of examples (reproducible verdicts); locally hypothesis explores freely.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
