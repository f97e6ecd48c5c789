"""The runner's token-id check (model_runner._ids): the few-ids fast path a decode step takes
agrees with the array path, errors included."""

from __future__ import annotations

import numpy as np
import pytest

from infercc.errors import InputError
from infercc.runtime.model_runner import _FEW_IDS, _ids


@pytest.mark.parametrize("tokens", [[5], (0, 9), [True, 3], list(range(_FEW_IDS)), list(range(_FEW_IDS + 1))])
def test_valid_ids_come_out_as_int64_whichever_path(tokens) -> None:
    out = _ids(tokens, 32)
    assert out.dtype == np.int64 and out.tolist() == [int(t) for t in tokens]
    assert _ids(np.asarray(tokens), 32).tolist() == out.tolist()
    assert _ids(tokens, None).tolist() == out.tolist()  # vocabulary unknown: only >= 0 is checked


@pytest.mark.parametrize("tokens, match", [([32], "token id 32 is outside"), ([3, -1], "token id -1 is outside"),
                                           ([np.int64(40)], "token id 40 is outside"), ([[1, 2]], "flat list")])
def test_bad_ids_are_refused_with_the_same_errors(tokens, match) -> None:
    with pytest.raises(InputError, match=match):
        _ids(tokens, 32)
