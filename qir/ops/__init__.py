"""Op definitions: the registry and every built-in op (imported here so they register)."""

# Importing these modules registers the built-in ops.
from qir.ops import elementwise, indexing, linalg, nn, quantized, shape  # noqa: F401
from qir.ops.registry import REQUIRED, Attr, OpDef, all_ops, get_op, has_op, register_op, unregister_op

__all__ = ["REQUIRED", "Attr", "OpDef", "all_ops", "get_op", "has_op", "register_op", "unregister_op"]
