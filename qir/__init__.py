"""qir: a quantized graph IR for neural networks, with passes and backends.

The public API is re-exported here::

    import qir
    m = qir.load("model.qir")          # text + lazily memory-mapped weights
    qir.verify(m)
    print(qir.print_module(m))
    outputs = qir.run(m, [inputs])     # the reference interpreter
    qir.save(m, "copy.qir")
    imp = qir.import_model("smollm2-135m")      # prefill + decode functions, tokenizer
    qir.generate(imp, "What is the capital of France?").text
    qir.perplexity(imp, pathlib.Path("text.txt")).ppl

See README.md for a tour and docs/text-format.md for the text format.
"""

from qir import evaluate, quant
from qir.dtypes import DType, dtype
from qir.errors import InterpretError, ParseError, QirError, QuantError, SerializationError, VerifyError
from qir.evaluate import perplexity
from qir.frontend.importer import LoadedImport, import_model
from qir.frontend.torch_export import from_exported_program, trace
from qir.generate import generate
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
    "dtype", "from_exported_program", "load", "parse", "parse_file", "print_module", "quant", "run", "save",
    "stored_bytes", "trace", "verify",
    # the frontend's model-level calls
    "LoadedImport", "evaluate", "generate", "import_model", "perplexity",
]
