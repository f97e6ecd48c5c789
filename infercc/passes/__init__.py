"""Passes: the ordered pipeline that turns an imported graph into an optimized one."""

from .base import Pass, PassContext
from .diagnostics import Diagnostics, PassRecord, Site
from .manager import PassManager
from .pipeline import PIPELINE, build_pipeline, pass_names

__all__ = [
    "Diagnostics", "PIPELINE", "Pass", "PassContext", "PassManager", "PassRecord", "Site", "build_pipeline",
    "pass_names",
]
