"""The model every server test serves: stories260K (a real 260K-parameter LLaMA with a
SentencePiece tokenizer), compiled once per session; skipped when the shared file is absent."""

from __future__ import annotations

import pytest

import infercc
from tests.importers._models import STORIES, require


@pytest.fixture(scope="session")
def stories():
    return infercc.compile(require(STORIES))
