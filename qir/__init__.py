"""qir: a quantized graph IR for neural networks, with passes and backends.

The public API is re-exported here::

    import qir
    m = qir.load("model.qir")          # text + lazily memory-mapped weights
    qir.verify(m)
    print(qir.print_module(m))
    outputs = qir.run(m, [inputs])     # the reference interpreter
    qir.save(m, "copy.qir")

See README.md for a tour and docs/text-format.md for the text format.
"""

from qir import quant
from qir.dtypes import DType, dtype
from qir.errors import InterpretError, ParseError, QirError, QuantError, SerializationError, VerifyError
from qir.graph import Constant, Function, Module, Op, Value
from qir.interpreter import Interpreter, run
from qir.parser import parse, parse_file
from qir.printer import print_module
from qir.quantspec import QuantSpec
from qir.serialize import load, save, stored_bytes
from qir.shapes import SymDim, dim
from qir.types import TensorType
from qir.verifier import check, verify

__version__ = "0.1.0"

__all__ = [
    "Constant", "DType", "Function", "InterpretError", "Interpreter", "Module", "Op", "ParseError", "QirError",
    "QuantError", "QuantSpec", "SerializationError", "SymDim", "TensorType", "Value", "VerifyError", "check", "dim",
    "dtype", "load", "parse", "parse_file", "print_module", "quant", "run", "save", "stored_bytes", "verify",
]
