"""The pass interface: a pass edits the model in place and records what it did."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from ..ir import Model
from .diagnostics import PassRecord

if TYPE_CHECKING:
    from ..config import Config


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the model: the config and its own diagnostics record."""

    config: Config
    record: PassRecord
    #: Facts established by earlier passes (their ``ensures``), e.g. "shapes".
    properties: set[str] = dataclasses.field(default_factory=set)
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)


class Pass:
    """Subclasses set ``name`` and implement ``run``.

    ``requires`` names properties an earlier pass must have ensured (the manager skips the pass with
    a reason otherwise); ``ensures`` names properties that hold after it ran.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()
    #: True for passes that change the outputs on purpose (quantization) or the model's interface
    #: (cache insertion). ``check_each_pass`` does not compare them with the reference; it takes
    #: their result as the new reference, so the passes after them are still checked. Such a pass
    #: must measure and report its own error.
    rebaseline: ClassVar[bool] = False

    def run(self, model: Model, ctx: PassContext) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"
