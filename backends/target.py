"""Targets as data: each backend target is a frozen :class:`Target` loaded from ``backends/targets/<name>.json``.

A target names its runtime and execution providers, the ONNX opset it is lowered at, how the lowering spells
quantized ops for it (``lowering``), ORT session settings, and its **rules**: each constraint the target imposes,
the public source it comes from, and the pass option that fixes a violation. :mod:`qir.backends.onnx.legality`
checks a module against them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qir.errors import QirError

__all__ = ["Rule", "Target", "TargetError", "list_targets", "load_target", "TARGET_DIR"]

TARGET_DIR = Path(__file__).with_name("targets")


class TargetError(QirError):
    """An unknown target or a malformed target file."""


@dataclass(frozen=True)
class Rule:
    """One constraint of a target: what it says, where it comes from, how to fix a violation."""

    id: str
    text: str
    source: str
    fix: str | None = None
    severity: str = "error"   # "error" refuses, "warning" is reported, "info" is documentation


@dataclass(frozen=True)
class Target:
    """A compilation target (see the module docstring)."""

    name: str
    description: str
    runtime: str
    providers: tuple[str, ...]
    opset: int
    opset_range: tuple[int, int]
    static_shapes: bool
    lowering: tuple[tuple[str, Any], ...]
    session_config: tuple[tuple[str, str], ...]
    rules: tuple[Rule, ...]
    allowed_ops: frozenset[str] | None = None
    path: str = field(default="", compare=False)
    tvm: str = ""   # runtime "tvm": the file's "tvm" section (TVM target dict, export settings) as JSON text

    def rule(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise TargetError(f"target {self.name} has no rule {rule_id!r}")

    def lowering_options(self) -> dict[str, Any]:
        return dict(self.lowering)

    def tvm_options(self) -> dict[str, Any]:
        """The ``"tvm"`` section of a TVM target file (``{"target": {...}, "cc": ...}``), empty otherwise."""
        return json.loads(self.tvm) if self.tvm else {}

    def to_json(self) -> dict[str, Any]:
        extra = {"tvm": self.tvm_options()} if self.tvm else {}
        return {
            **extra, "name": self.name, "description": self.description, "runtime": self.runtime,
            "providers": list(self.providers), "opset": self.opset, "opset_range": list(self.opset_range),
            "static_shapes": self.static_shapes, "lowering": dict(self.lowering),
            "session_config": dict(self.session_config),
            "allowed_ops": sorted(self.allowed_ops) if self.allowed_ops is not None else None,
            "rules": [{"id": r.id, "text": r.text, "source": r.source, "fix": r.fix, "severity": r.severity}
                      for r in self.rules],
        }


def list_targets() -> list[str]:
    """Names of the targets shipped in ``backends/targets``."""
    return sorted(p.stem for p in TARGET_DIR.glob("*.json"))


def load_target(name_or_path: str | Path) -> Target:
    """Load a target by name (``ort-cpu``) or from a JSON file path."""
    p = Path(name_or_path)
    if not p.suffix == ".json":
        p = TARGET_DIR / f"{name_or_path}.json"
        if not p.is_file():
            raise TargetError(f"unknown target {name_or_path!r}; known: {', '.join(list_targets())}")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise TargetError(f"{p}: cannot read the target file ({exc})") from None
    try:
        rules = tuple(Rule(id=r["id"], text=r["text"], source=r["source"], fix=r.get("fix"),
                           severity=r.get("severity", "error")) for r in data["rules"])
        # ONNX targets give an opset; TVM targets have none (0).
        lo, hi = data.get("opset_range", [0, 0])
        allowed = data.get("allowed_ops")
        return Target(name=data["name"], description=data["description"], runtime=data["runtime"],
                      providers=tuple(data.get("providers", [])), opset=int(data.get("opset", 0)),
                      opset_range=(int(lo), int(hi)),
                      static_shapes=bool(data["static_shapes"]),
                      lowering=tuple(sorted(data.get("lowering", {}).items())),
                      session_config=tuple(sorted(data.get("session_config", {}).items())), rules=rules,
                      allowed_ops=frozenset(allowed) if allowed is not None else None, path=str(p),
                      tvm=json.dumps(data["tvm"], sort_keys=True) if "tvm" in data else "")
    except (KeyError, TypeError, ValueError) as exc:
        raise TargetError(f"{p}: malformed target file ({type(exc).__name__}: {exc})") from None
