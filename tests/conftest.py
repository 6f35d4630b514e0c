"""Test setup: without a GPU, kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (its decorators read it), so this runs
before any test module imports gradkernels.
"""

import os
import sys

import torch

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
