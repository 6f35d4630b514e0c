"""README.md's Python examples run as written (on whatever device this machine has: they pick it).

Each ```python block is executed on its own, in a fresh namespace. A block may opt out with a first line
``# readme-test: not run (<reason>)``; it is then only compiled (syntax). One does: the ring-attention
training recipe, which needs a model and data of the reader's own (its layer runs in 2 and 4 processes in
tests/test_ring_attention.py). The transformers example builds a tiny model from a config (no download)
and is skipped only when the optional transformers extra is not installed.
"""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = re.compile(r"^# readme-test: not run \((.+)\)$")


def _blocks():
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(pytest.param(match.group(1), line, id=f"line{line}"))
    return blocks


BLOCKS = _blocks()


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code,line", BLOCKS)
def test_readme_python_block_runs(code, line):
    first = code.splitlines()[0]
    compiled = compile(code, f"README.md:{line}", "exec")
    not_run = NOT_RUN.match(first)
    if not_run:
        pytest.skip(f"README.md:{line} is marked not run: {not_run.group(1)}")
    if "import transformers" in code:
        pytest.importorskip("transformers", reason="the optional transformers extra is not installed")
    dist = torch.distributed
    had_group = dist.is_available() and dist.is_initialized()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compiled, {"__name__": "__readme__"})
    finally:
        # A block that starts a process group (the ring example) must not leave it to later tests.
        if dist.is_available() and dist.is_initialized() and not had_group:
            dist.destroy_process_group()
