"""The rewrite toolkit: declarative patterns, a matcher, and rules built from them."""

from .matcher import Match, Matcher, const_value, node_attr
from .pattern import Attr, Const, Or, Var
from .rule import Builder, RewritePass, Rule, apply_rules

__all__ = [
    "Attr", "Builder", "Const", "Match", "Matcher", "Or", "RewritePass", "Rule", "Var", "apply_rules",
    "const_value", "node_attr",
]
