"""Composition of several adapters into one virtual adapter (``adapter=["a", "b"],
adapter_weights=[...]``), as ``Config.lora_composition`` says:

* "stack": the weighted deltas applied one after the other, ``y = W x + sum_i w_i s_i B_i A_i x``.
  Exact; the ranks may differ and add up (A's stacked, B's side by side, each scaled by w_i s_i),
  which is what PEFT's ``add_weighted_adapter(combination_type="cat")`` builds.
* "merge": one adapter of the same rank whose factors are the weighted sums
  ``A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i`` -- task
  arithmetic on the factors, PEFT's ``combination_type="linear"``. Not the sum of the deltas (the
  product has cross terms B_i A_j); equal ranks required. PEFT gives the new adapter alpha = r, so
  its scaling is 1, or sqrt(r) when the first adapter uses rsLoRA; so does this.

Either way the result is module -> (A [r, in], B [out, r]) with the scaling already folded in
(scale 1), run like any adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .peft import AdapterError, LoraAdapter, LoraModule


def compose(adapters: Sequence[LoraAdapter], names: Sequence[str], weights: Sequence[float], mode: str,
            max_rank: int) -> dict[str, LoraModule]:
    """Module factors of the composition (scale folded in)."""
    modules = sorted({m for adapter in adapters for m in adapter.modules})
    if mode == "merge":
        ranks = {adapter.rank for adapter in adapters}
        if len(ranks) != 1:
            raise AdapterError(f"lora_composition='merge' averages the factors of adapters of one rank, but "
                               f"{list(names)} have ranks {[a.rank for a in adapters]}; use "
                               "lora_composition='stack' (the sum of their deltas)")
        rank = ranks.pop()
        outer = math.sqrt(rank) if adapters[0].use_rslora else 1.0
        out = {}
        for module in modules:
            a = b = None
            for adapter, weight in zip(adapters, weights):
                part = adapter.modules.get(module)
                if part is None:
                    continue
                w = weight * adapter.scaling
                root = math.sqrt(abs(w))
                a_i, b_i = part.a * (root if w >= 0 else -root), part.b * root
                a, b = (a_i, b_i) if a is None else (a + a_i, b + b_i)
            out[module] = LoraModule(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b * outer, np.float32))
        return out
    total = sum(adapter.rank for adapter in adapters)
    if total > max_rank:
        raise AdapterError(f"stacking {list(names)} gives rank {total} (the sum of their ranks), above "
                           f"Config.max_lora_rank={max_rank}; raise max_lora_rank or stack fewer adapters")
    out = {}
    for module in modules:
        parts = [(adapter.modules[module], weight * adapter.scaling) for adapter, weight in zip(adapters, weights)
                 if module in adapter.modules]
        a = np.concatenate([p.a for p, _ in parts], axis=0)
        b = np.concatenate([p.b * np.float32(s) for p, s in parts], axis=1)
        out[module] = LoraModule(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
    return out
