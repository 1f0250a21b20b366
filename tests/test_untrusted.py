"""Malformed and hostile input files, by kind: each fails fast with a ``QirError`` naming the file and the problem.

One table; every row builds a file (or a ``.qir`` + ``.safetensors`` pair) in a fresh folder, hands it to the
public entry point a user would call (``qir.load``, ``qir.import_model``, ``check_gguf``), and asserts

* the exception type (a :class:`~qir.errors.QirError` subclass) and a fragment of the message,
* that the message names the file,
* that it failed fast (nothing sized from the header was allocated),
* that no file in the folder was modified, created or removed (hashes before and after),
* that no code from the file ran (pickle payloads try to create a marker file).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import qir
from qir.errors import ParseError, QirError, SerializationError
from qir.frontend.onnx_import import ONNXImportError
from qir.frontend.pt2 import PT2ImportError
from qir.models.gguf_check import GGUFError, check_gguf

MARKER = "PWNED"


class _Evil:
    """Unpickling this runs code: it would create the marker file next to the input."""

    def __init__(self, folder: Path) -> None:
        self.target = str(folder / MARKER)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.target, "w"))


# -- .qir / .safetensors ---------------------------------------------------------------------------------------
VALID_QIR = """module @m

const @w : f32[2,3] = blob

func @main(%x: f32[1,3]) -> (f32[1,2]) {
  %y = linear %x, @w : f32[1,2]
  return %y
}
"""


def _st(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(head) if length is None else length).to_bytes(8, "little") + head + data


def _good_st() -> bytes:
    return _st({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, b"\0" * 24)


def qir_pair(text: str | bytes, st: bytes | None) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        p = folder / "model.qir"
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        if st is not None:
            (folder / "model.safetensors").write_bytes(st)
        return p
    return make


def _sparse_qir(size: int) -> Callable[[Path], Path]:
    """A .qir file of ``size`` bytes that takes no disk (sparse): reading it whole would take ``size`` of memory."""
    def make(folder: Path) -> Path:
        p = folder / "model.qir"
        with open(p, "wb") as f:
            f.write(b"module @m\n")
            f.truncate(size)
        return p
    return make


def load_qir(p: Path) -> object:
    return qir.load(p)


# -- .gguf -------------------------------------------------------------------------------------------------------
def _gs(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf(*, magic: bytes = b"GGUF", version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
         kv: bytes | None = None, tensors: list[tuple[bytes | str, list[int], int, int]] | None = None,
         data: bytes = b"\0" * 64, cut: int | None = None) -> Callable[[Path], Path]:
    """A GGUF file: one string key by default, ``tensors`` = (name, dims, ggml type, offset)."""
    kv = kv if kv is not None else _gs("general.architecture") + struct.pack("<I", 8) + _gs("llama")
    tensors = tensors if tensors is not None else [("t", [4, 2], 0, 0)]

    def make(folder: Path) -> Path:
        body = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                   1 if n_kv is None else n_kv) + kv
        for name, dims, gtype, offset in tensors:
            body += _gs(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            body += struct.pack("<IQ", gtype, offset)
        body += b"\0" * (-len(body) % 32) + data
        p = folder / "model.gguf"
        p.write_bytes(body[:cut] if cut is not None else body)
        return p
    return make


def import_path(p: Path) -> object:
    return qir.import_model(p)


# -- .onnx -------------------------------------------------------------------------------------------------------
def onnx_file(edit: Callable[..., object] | None = None, raw: bytes | None = None,
              cut: int | None = None) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        from onnx import TensorProto, helper

        p = folder / "model.onnx"
        if raw is not None:
            p.write_bytes(raw)
            return p
        w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], np.ones(6, np.float32).tobytes(), raw=True)
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        if edit is not None:
            edit(model, folder)
        data = model.SerializeToString()
        p.write_bytes(data[:cut] if cut is not None else data)
        return p
    return make


def _huge_initializer(model: object, folder: Path) -> None:
    from onnx import TensorProto

    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**6, 10**6], raw_data=b"\0" * 4)
    model.graph.ClearField("initializer")  # type: ignore[attr-defined]
    model.graph.initializer.append(t)  # type: ignore[attr-defined]


def _short_initializer(model: object, folder: Path) -> None:
    model.graph.initializer[0].raw_data = b"\0" * 8  # type: ignore[attr-defined]


def _outside_data(model: object, folder: Path) -> None:
    from onnx import TensorProto

    (folder.parent / "secret.bin").write_bytes(b"\1" * 24)
    t = model.graph.initializer[0]  # type: ignore[attr-defined]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "24")):
        e = t.external_data.add()
        e.key, e.value = k, v


def _huge_constant_of_shape(model: object, folder: Path) -> None:
    from onnx import TensorProto, helper

    g = model.graph  # type: ignore[attr-defined]
    shape = helper.make_tensor("big", TensorProto.INT64, [2], [100000, 100000])
    g.node.insert(0, helper.make_node("Constant", [], ["shape"], name="c", value=shape))
    g.node.insert(1, helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="cos"))
    g.node.append(helper.make_node("Add", ["y", "y"], ["y2"], name="add"))


def _huge_expand(model: object, folder: Path) -> None:
    from onnx import TensorProto, helper

    g = model.graph  # type: ignore[attr-defined]
    g.initializer.append(helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    g.initializer.append(helper.make_tensor("big", TensorProto.INT64, [2], [300000, 300000]))
    g.node.insert(0, helper.make_node("Expand", ["one", "big"], ["wide"], name="ex"))
    g.node.insert(1, helper.make_node("Add", ["wide", "wide"], ["wide2"], name="add"))


def _dangling_input(model: object, folder: Path) -> None:
    model.graph.node[0].input[1] = "nowhere"  # type: ignore[attr-defined]


# -- .pt2 --------------------------------------------------------------------------------------------------------
def pt2(entries: Callable[[Path], dict[str, bytes]] | None = None, raw: bytes | None = None
        ) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        p = folder / "model.pt2"
        if raw is not None:
            p.write_bytes(raw)
            return p
        with zipfile.ZipFile(p, "w") as z:
            for name, data in (entries(folder) if entries else {}).items():
                z.writestr(name, data)
        return p
    return make


def _pickled_samples(folder: Path) -> dict[str, bytes]:
    buf = io.BytesIO()
    pickle.dump({"x": _Evil(folder)}, buf)
    return {"model/archive_format": b"pt2", "model/data/sample_inputs/model.pt": buf.getvalue()}


def _pickled_weights(folder: Path) -> dict[str, bytes]:
    cfg = {"config": {"w": {"path_name": "weight_0", "is_param": True, "use_pickle": True}}}
    return {"model/archive_format": b"pt2", "model/data/weights/model_weights_config.json": json.dumps(cfg).encode(),
            "model/data/weights/weight_0": pickle.dumps(_Evil(folder))}


def _custom_object(folder: Path) -> dict[str, bytes]:
    return {"model/archive_format": b"pt2", "model/data/constants/custom_obj_0": pickle.dumps(_Evil(folder))}


# -- the table ---------------------------------------------------------------------------------------------------
CASES: list[tuple[str, Callable[[Path], Path], Callable[[Path], object], type[QirError], str]] = [
    # id, make the file(s), open it, exception type, message fragment
    ("qir-empty", qir_pair("", None), load_qir, ParseError, "expected 'module'"),
    ("qir-not-utf8", qir_pair(b"module @m\n\xff\xfe", None), load_qir, SerializationError, "not UTF-8"),
    ("qir-binary-garbage", qir_pair(bytes(range(256)) * 4, None), load_qir, SerializationError, "not UTF-8"),
    ("qir-truncated", qir_pair(VALID_QIR[:len(VALID_QIR) // 2 + 10], _good_st()), load_qir, ParseError, "expected"),
    ("qir-traversal-name", qir_pair(VALID_QIR.replace("@w", "@../../x"), _good_st()), load_qir, ParseError,
     "constant name"),
    ("qir-slash-name", qir_pair(VALID_QIR.replace("@w", "@a/b"), _good_st()), load_qir, ParseError, "constant name"),
    ("qir-huge-declared-blob", qir_pair(VALID_QIR.replace("f32[2,3]", "f32[1000000,1000000]"), _good_st()),
     load_qir, SerializationError, "declares"),
    ("qir-huge-dim-digits", qir_pair("module @m\nconst @c : f32[" + "9" * 5000 + "] = blob\n", None), load_qir,
     ParseError, "too long"),
    ("qir-sparse-256MB-text", _sparse_qir(256 << 20), load_qir, SerializationError, "more than the limit"),
    ("qir-missing-weights", qir_pair(VALID_QIR, None), load_qir, SerializationError, "does not exist"),
    ("safetensors-huge-header-length", qir_pair(VALID_QIR, _st({}, length=2**62)), load_qir, SerializationError,
     "exceeds"),
    ("safetensors-1e12-elements", qir_pair(VALID_QIR, _st({"w": {"dtype": "F32", "shape": [10**6, 10**6],
                                                                 "data_offsets": [0, 24]}}, b"\0" * 24)),
     load_qir, SerializationError, "'w'"),
    ("safetensors-traversal-name", qir_pair(VALID_QIR, _st({"../../x": {"dtype": "F32", "shape": [6],
                                                                        "data_offsets": [0, 24]}}, b"\0" * 24)),
     load_qir, SerializationError, "invalid tensor name"),
    ("safetensors-truncated", qir_pair(VALID_QIR, _good_st()[:-10]), load_qir, SerializationError, "past the end"),
    ("safetensors-not-json", qir_pair(VALID_QIR, _st(b"\x89PNG\r\n\x1a\n")), load_qir, SerializationError,
     "not valid JSON"),
    ("safetensors-empty", qir_pair(VALID_QIR, b""), load_qir, SerializationError, "too short"),
    ("gguf-wrong-magic", gguf(magic=b"GGML"), import_path, GGUFError, "not a GGUF file"),
    ("gguf-big-endian-version", gguf(version=3 << 24), import_path, GGUFError, "version"),
    ("gguf-2^40-tensors", gguf(n_tensors=2**40), import_path, GGUFError, "tensors, more than the limit"),
    ("gguf-2^40-kv", gguf(n_kv=2**40), import_path, GGUFError, "metadata entries, more than the limit"),
    ("gguf-huge-string", gguf(kv=struct.pack("<Q", 2**50) + b"general.name"), import_path, GGUFError,
     "more than the limit"),
    ("gguf-string-past-end", gguf(kv=struct.pack("<Q", 10**6) + b"general.name"), import_path, GGUFError,
     "truncated"),
    ("gguf-huge-array", gguf(kv=_gs("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)), import_path,
     GGUFError, "items, more than the limit"),
    ("gguf-1e12-elements", gguf(tensors=[("t", [10**6, 10**6], 0, 0)]), import_path, GGUFError,
     "more than the limit"),
    ("gguf-tensor-past-end", gguf(tensors=[("t", [4096, 4096], 0, 0)]), import_path, GGUFError,
     "runs past the end"),
    ("gguf-rank-100", gguf(tensors=[("t", [1] * 100, 0, 0)]), import_path, GGUFError, "dimensions"),
    ("gguf-unknown-type", gguf(tensors=[("t", [4, 2], 9999, 0)]), import_path, GGUFError, "unknown ggml type"),
    ("gguf-bad-name-utf8", gguf(tensors=[(b"\xff\xfe", [4, 2], 0, 0)]), import_path, GGUFError, "UTF-8"),
    ("gguf-overlap", gguf(tensors=[("a", [4, 2], 0, 0), ("b", [4, 2], 0, 0)]), import_path, GGUFError, "overlap"),
    ("gguf-truncated-header", gguf(cut=30), import_path, GGUFError, "truncated"),
    ("gguf-empty", gguf(cut=0), import_path, GGUFError, "too short"),
    ("onnx-garbage", onnx_file(raw=b"\x08\x07\x12\xff\xff\xff\xff\x0f" + b"\0" * 32), import_path, ONNXImportError,
     "not a readable ONNX model"),
    ("onnx-empty-file", onnx_file(raw=b""), import_path, ONNXImportError, "no graph outputs"),
    ("onnx-truncated", onnx_file(cut=40), import_path, ONNXImportError, ""),
    ("onnx-1e12-initializer", onnx_file(_huge_initializer), import_path, ONNXImportError, "more than the limit"),
    ("onnx-short-raw-data", onnx_file(_short_initializer), import_path, ONNXImportError, "holds 8 bytes"),
    ("onnx-external-data-outside", onnx_file(_outside_data), import_path, ONNXImportError, "outside"),
    ("onnx-huge-constant-of-shape", onnx_file(_huge_constant_of_shape), import_path, ONNXImportError,
     "ConstantOfShape"),
    ("onnx-huge-expand", onnx_file(_huge_expand), import_path, ONNXImportError, "Expand would build"),
    ("onnx-dangling-input", onnx_file(_dangling_input), import_path, ONNXImportError, "mm"),
    ("pt2-not-zip", pt2(raw=b"PK\3\4 not a zip"), import_path, PT2ImportError, "not a zip"),
    ("pt2-foreign-zip", pt2(lambda f: {"data.pkl": pickle.dumps(_Evil(f))}), import_path, PT2ImportError,
     "archive_format"),
    ("pt2-pickled-sample-inputs", pt2(_pickled_samples), import_path, PT2ImportError, "weights_only"),
    ("pt2-pickled-weights", pt2(_pickled_weights), import_path, PT2ImportError, "pickled"),
    ("pt2-custom-object", pt2(_custom_object), import_path, PT2ImportError, "custom object"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                out[str(p.relative_to(folder))] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


@pytest.mark.parametrize("make, open_, exc_type, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input(tmp_path: Path, make: Callable[[Path], Path], open_: Callable[[Path], object],
                         exc_type: type[QirError], fragment: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    path = make(folder)
    before = _snapshot(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(exc_type) as info:
        open_(path)
    seconds = time.perf_counter() - t0
    message = str(info.value)
    assert isinstance(info.value, QirError)
    assert fragment in message, message
    assert f"{folder}/model." in message, message  # names the file (the .qir or the .safetensors beside it)
    assert seconds < 20, seconds  # generous for a loaded CI machine; an allocation from the header takes far longer
    assert _snapshot(tmp_path) == before, "the input folder changed"
    assert not (folder / MARKER).exists(), "code from the file ran"


@pytest.mark.slow
def test_real_gguf_header_passes() -> None:
    """The checker accepts the real SmolLM2 file and reads its whole header (vocabulary included) quickly."""
    from qir.models import model_files

    path = model_files("smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    header = check_gguf(path)
    assert len(header.tensors) == 272 and "tokenizer.ggml.tokens" in header.keys
    assert all(t.offset + t.nbytes <= path.stat().st_size for t in header.tensors)


def test_gguf_writer_file_passes(tmp_path: Path) -> None:
    """A small file written by the ``gguf`` package (what llama.cpp tools write) passes the checker."""
    gguf_pkg = pytest.importorskip("gguf")
    path = tmp_path / "w.gguf"
    w = gguf_pkg.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("t", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("u", np.ones((2, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = check_gguf(path)
    assert [t.name for t in header.tensors] == ["t", "u"]
    assert [t.nbytes for t in header.tensors] == [48, 128]
