"""Cleanup passes: run first, so that fusions see one canonical, minimal graph."""

from .constant_folding import ConstantFolding
from .cse import CommonSubexpressionElimination, PostLoweringCSE
from .dce import DeadCodeElimination
from .layout import LayoutCanonicalization
from .noop import NoOpElimination
from .shape_simplify import ShapeSimplification

__all__ = [
    "CommonSubexpressionElimination", "ConstantFolding", "DeadCodeElimination", "LayoutCanonicalization",
    "NoOpElimination", "PostLoweringCSE", "ShapeSimplification",
]
