"""The ordered pass pipeline. Order matters: cleanup first so fusions see a minimal canonical
graph, cleanup again last to sweep what fusions left behind."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Pass
from .cleanup import (
    CommonSubexpressionElimination,
    ConstantFolding,
    DeadCodeElimination,
    LayoutCanonicalization,
    NoOpElimination,
    PostLoweringCSE,
    ShapeSimplification,
)
from .fusion.activations import ActivationFusion
from .fusion.attention_fuse import AttentionFusion
from .fusion.norms import NormFusion
from .fusion.pack_projections import PackProjections
from .fusion.rotary import RotaryFusion
from .hidden_output import ExposeHiddenState
from .kv_cache import KVCacheInsertion
from .lowering import LowerCanonicalOps
from .quantize import QuantizeWeights

if TYPE_CHECKING:
    from ..config import Config

#: Every pass, in pipeline order. A pass appears once; names are what users disable.
PIPELINE: list[type[Pass]] = [
    ConstantFolding,
    NoOpElimination,
    ShapeSimplification,
    LayoutCanonicalization,
    CommonSubexpressionElimination,
    # fusions go here: they see a cleaned graph and emit canonical ops
    ActivationFusion,
    NormFusion,
    RotaryFusion,
    AttentionFusion,
    KVCacheInsertion,  # after the attention fusion (it caches canonical Attention), before lowering
    QuantizeWeights,  # after the fusions (they match float MatMuls), before lowering
    PackProjections,  # after quantization (it decides per weight): q/k/v and gate/up share one matmul
    LowerCanonicalOps,
    PostLoweringCSE,  # lowerings emit their plumbing per site (masks, rotary tables): merged here
    DeadCodeElimination,
    ExposeHiddenState,  # last: speculation heads read the final hidden state (a no-op otherwise)
]


def pass_names() -> list[str]:
    return [p.name for p in PIPELINE]


def build_pipeline(config: Config) -> list[Pass]:
    """The passes this config runs (none when optimization is off)."""
    if not config.optimize:
        return []
    return [cls() for cls in PIPELINE if cls.name not in config.disable_passes]
