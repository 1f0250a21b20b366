"""qir: a quantized graph IR for neural networks, with passes and backends.

The public API is re-exported here; see README.md for a tour.
"""

from qir.dtypes import DType, dtype
from qir.errors import InterpretError, ParseError, QirError, QuantError, SerializationError, VerifyError
from qir.graph import Constant, Function, Module, Op, Value
from qir.quantspec import QuantSpec
from qir.shapes import SymDim, dim
from qir.types import TensorType

__version__ = "0.1.0"

__all__ = [
    "Constant", "DType", "Function", "InterpretError", "Module", "Op", "ParseError", "QirError", "QuantError",
    "QuantSpec", "SerializationError", "SymDim", "TensorType", "Value", "VerifyError", "dim", "dtype",
]
