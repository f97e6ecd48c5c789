"""Diagnostics: what every pass changed, skipped and why. A product feature: users read these to
learn why their model was not optimized, so reasons are sentences, not codes."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

APPLIED, SKIPPED, FAILED = "applied", "skipped", "failed"


@dataclasses.dataclass
class Site:
    """One place a pass looked at: a node or subgraph, and what it decided there."""

    where: str
    status: str
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PassRecord:
    pass_name: str
    status: str = SKIPPED
    changes: dict[str, int] = dataclasses.field(default_factory=dict)
    reasons: list[str] = dataclasses.field(default_factory=list)
    sites: list[Site] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    # -- recording API used by passes ---------------------------------------------------------
    def count(self, what: str, n: int = 1) -> None:
        """Record n changes of a kind (e.g. "nodes_removed"); any change marks the pass applied."""
        if n:
            self.changes[what] = self.changes.get(what, 0) + n

    def applied(self, where: str, what: str = "sites_changed") -> None:
        self.sites.append(Site(where, APPLIED))
        self.count(what)

    def skipped(self, where: str, reason: str) -> None:
        self.sites.append(Site(where, SKIPPED, reason))

    def note(self, reason: str) -> None:
        """A pass-level reason (why the whole pass did nothing, or a caveat)."""
        if reason not in self.reasons:
            self.reasons.append(reason)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def finish(self) -> None:
        if self.status != FAILED:
            self.status = APPLIED if self.changes else SKIPPED
        skipped = Counter(s.reason for s in self.sites if s.status == SKIPPED)
        for reason, n in skipped.most_common():
            self.note(f"{n} site(s) skipped: {reason}" if n > 1 else f"1 site skipped: {reason}")
        if self.status == SKIPPED and not self.reasons:
            self.note("nothing to do: no site matched")

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "status": self.status,
            "changes": dict(self.changes),
            "reasons": list(self.reasons),
            "seconds": round(self.seconds, 6),
            "warnings": list(self.warnings),
            "sites": [s.to_dict() for s in self.sites],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PassRecord:
        return cls(
            pass_name=d["pass"], status=d["status"], changes=dict(d.get("changes", {})),
            reasons=list(d.get("reasons", [])), sites=[Site(**s) for s in d.get("sites", [])],
            warnings=list(d.get("warnings", [])), info=dict(d.get("info", {})), seconds=d.get("seconds", 0.0),
        )


class Diagnostics:
    """Ordered pass records plus facts about the compilation (provider, model family...)."""

    def __init__(self, records: list[PassRecord] | None = None, facts: dict[str, Any] | None = None) -> None:
        self.records = records or []
        self.facts = facts or {}

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, pass_name: str) -> PassRecord:
        for r in self.records:
            if r.pass_name == pass_name:
                return r
        raise KeyError(f"no pass named {pass_name!r} ran; passes: {[r.pass_name for r in self.records]}")

    def __eq__(self, other: object) -> bool:
        # Compared as saved (JSON): a tuple in ``info`` reads back as a list, and a model loaded
        # from disk must equal the one that was saved.
        return isinstance(other, Diagnostics) and json.loads(self.to_json()) == json.loads(other.to_json())

    @property
    def warnings(self) -> list[str]:
        return [f"{r.pass_name}: {w}" for r in self.records for w in r.warnings]

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        return {"facts": self.facts, "passes": self.to_list()}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Diagnostics:
        return cls([PassRecord.from_dict(r) for r in d.get("passes", [])], dict(d.get("facts", {})))

    def table(self, *, sites: bool = False) -> str:
        """A fixed-width table: one row per pass, with its changes and the first reasons."""
        rows = [("pass", "status", "changes", "time", "reasons")]
        for r in self.records:
            changes = _wrap([f"{k}={v}" for k, v in r.changes.items()]) or ["-"]
            reasons = r.reasons + [f"WARNING: {w}" for w in r.warnings]
            rows.append((r.pass_name, r.status, changes[0], f"{r.seconds * 1000:.1f} ms", reasons[0] if reasons else ""))
            more = max(len(changes), len(reasons)) - 1
            rows.extend(("", "", changes[i] if i < len(changes) else "", "", reasons[i] if i < len(reasons) else "")
                        for i in range(1, more + 1))
            if sites:
                rows.extend(("", f"  {s.status}", s.where, "", s.reason) for s in r.sites)
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for k, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
            if k == 0:
                lines.append("-" * min(120, sum(widths) + 8 + max(len(row[4]) for row in rows)))
        facts = [f"{k}: {v}" for k, v in self.facts.items()]
        return "\n".join(lines + ([""] + facts if facts else []))

    def __str__(self) -> str:
        return self.table()


#: Width of the changes column: a pass with many kinds of change wraps instead of pushing the
#: reasons off the screen.
CHANGES_WIDTH = 48


def _wrap(items: list[str], width: int = CHANGES_WIDTH) -> list[str]:
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += ", " + item
        else:
            lines.append(item)
    return lines
