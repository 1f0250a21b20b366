"""Op definitions: the registry and every built-in op (imported here so they register)."""

from qir.ops.registry import REQUIRED, Attr, OpDef, all_ops, get_op, has_op, register_op

__all__ = ["REQUIRED", "Attr", "OpDef", "all_ops", "get_op", "has_op", "register_op"]
