"""Fixtures shared by the runtime tests."""

import pytest

import infercc
from tests.fuzz.synthetic import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_c(tmp_path_factory: pytest.TempPathFactory) -> infercc.CompiledModel:
    """The tiny synthetic LLaMA GGUF on the generated-C runtime (skips where it cannot build)."""
    compiled = infercc.compile(write_tiny_gguf(tmp_path_factory.mktemp("tiny_c") / "tiny.gguf"), backend="c")
    if compiled.runtime != "c":
        pytest.skip(f"the generated-C runtime is not available here: {compiled.runtime_reason}")
    return compiled
