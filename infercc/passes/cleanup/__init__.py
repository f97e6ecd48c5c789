"""Cleanup passes: run first, so that fusions see one canonical, minimal graph."""

from .constant_folding import ConstantFolding
from .cse import CommonSubexpressionElimination
from .dce import DeadCodeElimination
from .noop import NoOpElimination
from .shape_simplify import ShapeSimplification

__all__ = [
    "CommonSubexpressionElimination", "ConstantFolding", "DeadCodeElimination", "NoOpElimination",
    "ShapeSimplification",
]
