"""The ``quantize`` pass: ``linear`` and ``embedding`` ops on constant weights become ``qmatmul`` / ``qembedding``.

``quantize{scheme=w8a8|w8a16|w4a16|w4a8, act=dynamic|static, group=0, symmetric=true, zero=int|float,
rounding=rtn|gptq, embedding=i8, head=i8, overrides="", damp=0.01, block=128, sink=0, act_order=true,
keep_calib=false}``

Schemes (weights ``[N, K]``; ``group=0``: one scale per output row, ``axis=0``; ``group=g``: one scale
per ``g`` input columns, ``axis=1, group=g`` -- when ``g`` does not divide ``K`` the last group is
short and qir pads it, e.g. g128 on K=576 gives 5 groups, the last of 64 columns):

``w8a16``  i8 weights, float activations (weight-only).
``w4a16``  i4 weights (u4 plus a zero point with ``symmetric=false``), float activations.
``w8a8``   i8 weights and i8 activations: ``act=dynamic`` inserts
           ``quantize %x : i8[..,K] q(axis=-1, group=K, dynamic)`` (symmetric, one scale per token);
           ``act=static`` uses the calibrated range of ``%x`` (``calib.*`` constants written by
           ``calibrate``), per tensor, **asymmetric u8** with literal parameters
           (``u8[..] q(scale=s, zp=z)``): activations feeding linears are skewed (SiLU·up products,
           residual streams), and an asymmetric range spends all 256 codes on what was observed.
           Without statistics for a value the pass stops and names it.
``w4a8``   i4 weights (per group or per channel) with i8 activations (dynamic per token by default).

With ``symmetric=false`` weights are asymmetric: u8 / u4 codes plus a zero-point constant ``@<w>.zp``
(stored in i8/u8). Scales are stored as **f32** (``@<w>.scale``; simple and exact).
``zero=float`` (``group > 0``) stores a float **minimum** per group instead of an integer zero
point -- llama.cpp's ``Q4_1`` blocks: ``u4[..] q(axis=1, group=32, scale=@<w>.scale, offset=@<w>.min)``,
``w ~ scale*q + min`` over the group's own range, not widened to contain 0 (an integer zero point must lie on
the code grid, which costs a whole code step on one-signed groups). On SmolLM2-135M, whose weights come from a
Q4_1 file, ``w4a16`` with ``group=32,zero=float`` finds the file's own blocks again (lossless at 4 bits plus the
parameters); ``compress-scales`` then shrinks those parameters. The per-row head/embedding keep ``head`` /
``embedding``'s integer formats. The quantized
constant KEEPS the float weight's name (``@model.layers.0.mlp.up_proj.weight`` is now ``i4[...]``),
so ``qir diff`` shows a type change, not a rename; only when the float tensor must stay too (another
op still reads it) is the quantized copy named ``@<w>.q``.

One ``quantize`` op per distinct activation value and function (q, k and v projections share one),
inserted before its first quantized user.

Embeddings and the head: an ``embedding`` op whose table is a constant becomes ``qembedding`` with the
table quantized per row (``axis=0``) as ``embedding`` says. The output head -- a ``linear`` whose weight
is also an embedding table (tied), or, untied, a ``linear`` whose result is returned and whose output
size equals an embedding table's vocabulary -- is quantized per row as ``head`` says, weight-only.
``embedding`` / ``head`` take ``i8``, ``i4``, ``i2`` (one scale per row), the same with a group suffix --
``i4g32``: one scale (with ``zero=float``, also one minimum) per 32 columns -- or ``none``. A
tied table is ONE quantized constant used by both ``qembedding`` and ``qmatmul``; tied ``embedding``
and ``head`` must then agree (or one of them be ``none``, which keeps the float table for that user
and gives the other a quantized copy ``@<w>.q``).

``overrides="lm_head*=none;*.down_proj.weight=w8a16"``: ``;``-separated ``fnmatch`` patterns over the
weight constant's name, each ``= scheme`` or ``= none`` (keep float); the last matching pattern wins,
and it beats ``head`` / ``embedding`` for the constants it matches. Overrides also take ``w2a16`` (2-bit
weights) and a ``:tensor`` suffix -- ``*.layers.3.mlp.down_proj.weight=w2a16:tensor`` -- for ONE scale per
weight tensor (literal parameters in the type, always rounded to nearest): the coarse settings that
``qir debug`` experiments and sensitivity studies need.

``rounding=gptq`` quantizes each linear weight with GPTQ (:mod:`qir.passes.gptq`): the calibration
feeds of ``PassContext`` run through the float function once to accumulate ``H = 2 X^T X`` per distinct
input (float64, ``K x K``); ``damp`` and ``block`` are GPTQ's dampening fraction and block size. ``sink``: the
first position of every calibration sequence (an LLM's attention sink) counts ``sink`` times in ``H``; ``sink=0``
(default) is :data:`qir.passes.gptq.SINK_WEIGHT` for a causal LM (a module with a ``decode`` function) and 1
otherwise (that constant's docstring says why; ``sink=1`` is plain GPTQ). ``act_order=true`` (default) quantizes
the columns in order of decreasing ``H`` diagonal (the loudest inputs first, while later columns can still absorb
their error), with *static* groups: each group's scale and zero point are chosen from the original weights up
front, so the stored layout is unchanged (on SmolLM2 w4a16 g128: ppl 27.78 without, 26.85 with). Tied
embedding/head tables are rounded to nearest (the lookup reads them too). ``rounding=rtn`` rounds to
nearest with min/max scales (:func:`qir.quant.choose_params`).

``quantize`` consumes calibration statistics: it removes every ``calib.*`` constant when it is done
(``keep_calib=true`` keeps them).

Memory. When the weights to round to nearest hold more than :data:`STREAM_ELEMENTS` elements together
(a model of a few hundred million parameters and up), the pass streams: each weight is read in blocks of
rows to choose its scales, and its codes become a :class:`LazyCodes` that quantizes block by block again
when read (by ``qir.save``, which writes one tensor at a time), so neither the float weights nor the codes
of the whole model are ever in memory at once. The codes are the same as without streaming.

Before::

    const @w1 : f32[3,4] = dense(...)
    func @main(%x: f32[1,seq,4]) -> (f32[1,seq,3]) {
      %h = linear %x, @w1 : f32[1,seq,3]
      return %h
    }

After ``quantize{scheme=w8a8}``::

    const @w1 : i8[3,4] q(axis=0, scale=@w1.scale) = dense(...)
    const @w1.scale : f32[3] = dense(...)
    func @main(%x: f32[1,seq,4]) -> (f32[1,seq,3]) {
      %x.q = quantize %x : i8[1,seq,4] q(axis=2, group=4, dynamic)
      %h = qmatmul %x.q, @w1 : f32[1,seq,3]
      return %h
    }

After ``calibrate,quantize{scheme=w8a8,act=static}`` with ``%x`` calibrated to [-2.0, 3.0] the ``quantize``
line is ``%x.q = quantize %x : u8[1,seq,4] q(scale=0.019607844, zp=102)`` (scale 5/255, zero point
2/scale). After ``quantize{scheme=w4a16,group=32}`` the weight is
``i4[3,4] q(axis=1, group=32, scale=@w1.scale)`` with ``@w1.scale : f32[3,1]`` and no ``quantize`` op.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qir import quant
from qir.dtypes import dtype
from qir.errors import QirError
from qir.graph import Function, Module, Op, Value
from qir.passes.base import Pass
from qir.passes.calibrate import calibration_function, calibration_stats, remove_calibration
from qir.passes.gptq import HessianAccumulator, gptq_quantize, rtn_quantize, sink_weight
from qir.passes.registry import register_pass
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["SCHEMES", "Quantize", "WeightFormat", "parse_overrides"]

STREAM_ELEMENTS = 1 << 28
"""Above this many weight elements to round to nearest in one run, ``quantize`` streams (see the docstring)."""

BLOCK_ELEMENTS = 1 << 22
"""Weight elements quantized at a time when streaming (a block of whole rows)."""

SCHEMES: dict[str, tuple[int, bool]] = {
    # scheme: (weight bits, activations quantized to 8 bits)
    "w8a8": (8, True),
    "w8a16": (8, False),
    "w4a16": (4, False),
    "w4a8": (4, True),
    "w2a16": (2, False),  # overrides only (the `scheme` option keeps the four above)
}

#: A table format (``embedding=`` / ``head=`` / a table's override): bits per code, optionally ``g<group>``.
TABLE_FORMAT = re.compile(r"[iu]?([248])(?:g([1-9][0-9]*))?")

#: Suffix of an override value that asks for one scale per weight tensor (``w2a16:tensor``).
PER_TENSOR = ":tensor"


@dataclass(frozen=True)
class WeightFormat:
    """How one weight constant is stored: dtype, granularity (axis 0 per row, axis 1 per group, None per tensor)."""

    dtype: str
    axis: int | None
    group: int | None
    symmetric: bool
    minimum: bool = False  # a float minimum per group (spec offset) instead of an integer zero point

    def describe(self) -> str:
        gran = "per tensor" if self.axis is None else "per row" if self.group is None else f"groups of {self.group}"
        return f"{self.dtype} {gran}" + (" with a float minimum" if self.minimum else "")


@dataclass
class _Use:
    """One op that reads a weight constant and what the pass wants to do with it."""

    func: Function
    op: Op
    kind: str  # "linear" | "embedding" | "other"
    fmt: WeightFormat | None  # None: keep this use float
    act: str = "float"  # "float" | "dynamic" | "static"
    rounding: str = "rtn"


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    rows = max(1, BLOCK_ELEMENTS // max(1, int(np.prod(shape[1:], dtype=np.int64))))
    return [(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]


def _read_rows(source: object, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of a constant's data as f32 (a lazy source is mapped for this block only)."""
    data = source if isinstance(source, np.ndarray) else source.numpy()  # type: ignore[attr-defined]
    return np.asarray(data[r0:r1], dtype=np.float32)


def _rtn_args(fmt: WeightFormat) -> dict[str, object]:
    return {"axis": 0} if fmt.group is None else {"axis": 1, "group_size": fmt.group}


def streamed_params(wname: str, source: object, shape: tuple[int, ...], fmt: WeightFormat
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Round-to-nearest scale and zero point of a ``[N, K]`` weight, read a block of rows at a time.

    Rows are independent at both granularities (per row, per group of columns), so the result equals
    :func:`qir.passes.gptq.rtn_quantize`'s.
    """
    scales: list[np.ndarray] = []
    zps: list[np.ndarray] = []
    for r0, r1 in _row_blocks(shape):
        try:
            if fmt.minimum:
                _, scale, zp = rtn_quantize(_read_rows(source, r0, r1), fmt.dtype, group=fmt.group, symmetric=False,
                                            minimum=True)
            else:
                _, scale, zp = quant.choose_params(_read_rows(source, r0, r1), fmt.dtype, symmetric=fmt.symmetric,
                                                   **_rtn_args(fmt))  # type: ignore[arg-type]
        except QirError as exc:
            raise QirError(f"quantize: weight @{wname}, rows {r0}..{r1 - 1}: {exc}") from None
        scales.append(scale)
        if zp is not None:
            zps.append(zp)
    return np.concatenate(scales), (np.concatenate(zps) if zps else None)


class LazyCodes:
    """The integer codes of a weight quantized to nearest, computed block by block each time they are read.

    Holds the float weight's data (usually a memory-mapped tensor) and the chosen parameters, not the codes:
    ``numpy()`` returns a new array, and nothing is kept once the caller drops it.
    """

    def __init__(self, source: object, shape: tuple[int, ...], fmt: WeightFormat, scale: np.ndarray,
                 zp: np.ndarray | None) -> None:
        self.source = source
        self.shape = shape
        self.fmt = fmt
        self.scale = scale
        self.zp = zp
        self.dtype = dtype(fmt.dtype).numpy

    def numpy(self) -> np.ndarray:
        d = dtype(self.fmt.dtype)
        spec = QuantSpec(axis=0 if self.fmt.group is None else 1, group_size=self.fmt.group, scale="s",
                         zero_point=None if self.zp is None else "z", symmetric=self.fmt.symmetric)
        out = np.empty(self.shape, dtype=d.numpy)
        for r0, r1 in _row_blocks(self.shape):
            zp = None if self.zp is None else self.zp[r0:r1]
            rows = _read_rows(self.source, r0, r1)
            if self.fmt.minimum:
                assert zp is not None
                out[r0:r1] = rtn_quantize(rows, d, group=self.fmt.group, symmetric=False, minimum=True)[0]
            else:
                out[r0:r1] = quant.quantize_spec(rows, spec, d, self.scale[r0:r1], zp).codes
        return out

    def __repr__(self) -> str:
        return f"<LazyCodes {self.fmt.describe()} {list(self.shape)}>"


def _table_format(option: str, text: str) -> tuple[int, int | None] | None:
    """``embedding=`` / ``head=``: ``none``, ``i8``/``i4``/``i2`` per row, or ``i4g32`` in groups of 32 inputs."""
    if text == "none":
        return None
    m = TABLE_FORMAT.fullmatch(text)
    if m is None:
        raise QirError(f"quantize: {option}={text!r}; use none, i8, i4 or i2 (one scale per row) or a group size "
                       "suffix such as i4g32 (one scale per 32 columns)")
    return int(m.group(1)), None if m.group(2) is None else int(m.group(2))


def _is_table_format(text: str) -> bool:
    return TABLE_FORMAT.fullmatch(text) is not None


def parse_overrides(text: str) -> list[tuple[str, str]]:
    """``"pat=scheme;pat2=none"`` as ``[(pattern, scheme_or_none), ...]`` (order kept: the last match wins)."""
    rules: list[tuple[str, str]] = []
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        pattern, eq, value = item.rpartition("=")
        pattern, value = pattern.strip(), value.strip()
        if not eq or not pattern:
            raise QirError(f"quantize: override {item!r} must be PATTERN=SCHEME (e.g. 'lm_head*=none')")
        base = value.removesuffix(PER_TENSOR)
        if value != "none" and base not in SCHEMES and not _is_table_format(value):
            raise QirError(f"quantize: override {item!r} names {value!r}; use one of {', '.join(SCHEMES)} (optionally "
                           f"with {PER_TENSOR} for one scale per tensor), a table format such as i8, i4g32 or u2g32 "
                           "(embedding tables and heads only), or none")
        rules.append((pattern, value))
    return rules


def _nonfinite_hint(w: np.ndarray) -> str:
    """`` (first NaN at [3, 7]; 2 NaN/Inf in all)`` for a weight with non-finite elements, else ``""``."""
    bad = ~np.isfinite(w)
    n = int(bad.sum())
    if not n:
        return ""
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), w.shape)]
    return f" (first non-finite element {w[tuple(first)]} at {first}; {n} NaN/Inf in all)"


@register_pass
@dataclass
class Quantize(Pass):
    """Quantize linear and embedding weights (w8a8, w8a16, w4a16, w4a8; RTN or GPTQ); see the module docstring."""

    name = "quantize"
    scheme: Literal["w8a8", "w8a16", "w4a16", "w4a8"] = "w8a8"
    act: Literal["dynamic", "static"] = "dynamic"
    group: int = 0
    symmetric: bool = True
    zero: Literal["int", "float"] = "int"
    rounding: Literal["rtn", "gptq"] = "rtn"
    embedding: str = "i8"
    head: str = "i8"
    overrides: str = ""
    damp: float = 0.01
    block: int = 128
    sink: float = 0.0
    act_order: bool = True
    keep_calib: bool = False

    def __post_init__(self) -> None:
        # Checked when the pipeline is parsed, before anything runs.
        _table_format("embedding", self.embedding)
        _table_format("head", self.head)

    # -- choices ------------------------------------------------------------------------------------------
    def _format(self, bits: int, *, per_row: bool = False, per_tensor: bool = False) -> WeightFormat:
        signed = "i" if self.symmetric else "u"
        if per_tensor:
            return WeightFormat(f"{signed}{bits}", None, None, self.symmetric)
        group = None if per_row or self.group == 0 else self.group
        if group is not None and self.zero == "float":
            return WeightFormat(f"u{bits}", 1, group, False, minimum=True)
        return WeightFormat(f"{signed}{bits}", 0 if group is None else 1, group, self.symmetric)

    def _override(self, weight: str) -> str | None:
        chosen = None
        for pattern, value in self._rules:
            if fnmatch.fnmatchcase(weight, pattern):
                chosen = value
        return chosen

    def _linear_choice(self, weight: str, is_head: bool) -> tuple[WeightFormat | None, str]:
        override = self._override(weight)
        if override == "none":
            return None, "float"
        if override is not None and _is_table_format(override):
            if not is_head:
                raise QirError(f"quantize: the override {override!r} for @{weight} is a table format; it applies to "
                               f"embedding tables and output heads, and @{weight} is neither: give it a scheme "
                               f"({', '.join(SCHEMES)})")
            return self._table(*_table_format("overrides", override)), "float"  # type: ignore[misc]
        if override is None and is_head:
            table = _table_format("head", self.head)
            if table is None:
                return None, "float"
            return self._table(*table), "float"
        scheme = override or self.scheme
        bits, act8 = SCHEMES[scheme.removesuffix(PER_TENSOR)]
        return self._format(bits, per_tensor=scheme.endswith(PER_TENSOR)), (self.act if act8 else "float")

    def _embedding_choice(self, weight: str) -> WeightFormat | None:
        override = self._override(weight)
        if override == "none":
            return None
        if override is not None and _is_table_format(override):
            return self._table(*_table_format("overrides", override))  # type: ignore[misc]
        if override is not None:
            return self._format(SCHEMES[override.removesuffix(PER_TENSOR)][0], per_row=True,
                                per_tensor=override.endswith(PER_TENSOR))
        table = _table_format("embedding", self.embedding)
        return None if table is None else self._table(*table)

    def _table(self, bits: int, group: int | None) -> WeightFormat:
        """An embedding table's / head's format: per row, or in groups along the row (``i4g32``)."""
        if group is None:
            return self._format(bits, per_row=True)
        if self.zero == "float":
            return WeightFormat(f"u{bits}", 1, group, False, minimum=True)
        signed = "i" if self.symmetric else "u"
        return WeightFormat(f"{signed}{bits}", 1, group, self.symmetric)

    # -- the pass -------------------------------------------------------------------------------------------
    def run(self, module: Module) -> None:
        if self.group < 0:
            raise QirError(f"quantize: group must be >= 0 (0 = per output channel), got {self.group}")
        self._sink = sink_weight(module, self.sink, "quantize")
        if self.zero == "float" and self.group == 0:
            raise QirError("quantize: zero=float stores one float minimum per group of inputs; give a group size "
                           "(e.g. group=32), or use zero=int for one zero point per output row")
        # Per-run state (not options): the parsed overrides and, per weight, (codes name, final name).
        self._rules: list[tuple[str, str]] = parse_overrides(self.overrides)
        self._pending: dict[str, tuple[str, str]] = {}
        uses = self._plan(module)
        formats = self._resolve_formats(module, uses)
        stats = self._static_stats(module, uses, formats)
        hessians = self._collect_hessians(module, uses, formats) if self.rounding == "gptq" else {}
        rtn_elements = sum(module.constant(w).type.numel() for w in formats if w not in hessians)
        self._stream = rtn_elements > STREAM_ELEMENTS
        for wname, fmt in formats.items():
            # pop: an H is freed as soon as the last weight that reads its input is done
            self._quantize_constant(module, wname, fmt, uses[wname], hessians.pop(wname, None))
        self._rewrite(module, uses, formats, stats)
        if not self.keep_calib:
            remove_calibration(module)

    def _plan(self, module: Module) -> dict[str, list[_Use]]:
        """Every use of every constant read as a linear weight or an embedding table, with the wanted format."""
        tables: dict[str, int] = {}
        for func in module.functions.values():
            for op in func.find_ops("embedding"):
                t = op.operands[0]
                if t.is_constant:
                    tables[t.name] = int(t.type.shape[0]) if isinstance(t.type.shape[0], int) else -1
        vocab = set(tables.values())
        uses: dict[str, list[_Use]] = {}
        candidates: set[str] = set(tables)
        for func in module.functions.values():
            for op in func.ops:
                if op.opcode == "linear" and len(op.operands) >= 2 and op.operands[1].is_constant:
                    candidates.add(op.operands[1].name)
        for func in module.functions.values():
            outputs = {id(v) for v in func.outputs}
            for op in func.ops:
                for index, v in enumerate(op.operands):
                    if not v.is_constant or v.name not in candidates:
                        continue
                    if op.opcode == "linear" and index == 1 and v.type.dtype.is_float and v.type.quant is None:
                        n_out = v.type.shape[0]
                        is_head = v.name in tables or (id(op.result) in outputs and n_out in vocab)
                        fmt, act = self._linear_choice(v.name, is_head)
                        rounding = self.rounding if v.name not in tables else "rtn"
                        uses.setdefault(v.name, []).append(_Use(func, op, "linear", fmt, act, rounding))
                    elif op.opcode == "embedding" and index == 0 and v.type.dtype.is_float:
                        uses.setdefault(v.name, []).append(_Use(func, op, "embedding",
                                                                self._embedding_choice(v.name)))
                    else:
                        uses.setdefault(v.name, []).append(_Use(func, op, "other", None))
        return uses

    def _resolve_formats(self, module: Module, uses: dict[str, list[_Use]]) -> dict[str, WeightFormat]:
        """One format per weight constant; tied users that want different formats are an error."""
        formats: dict[str, WeightFormat] = {}
        for wname, ulist in uses.items():
            wanted = {u.fmt for u in ulist if u.fmt is not None}
            if not wanted:
                continue
            if len(wanted) > 1:
                detail = "; ".join(f"{u.kind} %{u.op.results[0].name} in @{u.func.name} wants "
                                   f"{u.fmt.describe() if u.fmt else 'float'}" for u in ulist)
                raise QirError(f"quantize: @{wname} is shared (tied) by ops that want different quantized "
                               f"formats ({detail}); one constant has one format: give the embedding and head "
                               "the same type (e.g. embedding=i8,head=i8), or keep one float with none")
            c = module.constant(wname)
            if c.type.rank != 2 or not all(isinstance(d, int) for d in c.type.shape):
                raise QirError(f"quantize: weight @{wname} is {c.type}; only static 2-D [out, in] weights quantize")
            if not c.has_data:
                raise QirError(f"quantize: weight @{wname} has no data (the .qir text was read without its "
                               ".safetensors file); load the module with qir.load")
            formats[wname] = next(iter(wanted))
        return formats

    def _static_stats(self, module: Module, uses: dict[str, list[_Use]], formats: dict[str, WeightFormat]
                      ) -> dict[tuple[str, str], tuple[float, float]]:
        """``(function, value) -> (lo, hi)`` for every activation that gets a static quantize op."""
        # The same weight's input in another (calibrated) function stands in for a function that was not
        # calibrated: prefill's statistics serve decode, whose values are named differently.
        by_weight: dict[str, list[tuple[str, str]]] = {}
        for wname, ulist in uses.items():
            for u in ulist:
                if u.kind == "linear":
                    by_weight.setdefault(wname, []).append((u.func.name, u.op.operands[0].name))
        out: dict[tuple[str, str], tuple[float, float]] = {}
        for wname, ulist in uses.items():
            if wname not in formats:
                continue
            for u in ulist:
                if u.kind != "linear" or u.fmt is None or u.act != "static":
                    continue
                x = u.op.operands[0]
                key = (u.func.name, x.name)
                if key in out:
                    continue
                st = calibration_stats(module, x.name, u.func.name)
                if st is None:
                    for fname, vname in by_weight.get(wname, []):
                        st = calibration_stats(module, vname, fname)
                        if st is not None:
                            break
                if st is None:
                    raise QirError(
                        f"quantize{{act=static}}: no calibration statistics for %{x.name}, the input of linear "
                        f"%{u.op.result.name} (weight @{wname}) in @{u.func.name}; run calibrate first, e.g. "
                        f"the pipeline 'calibrate,quantize{{scheme={self.scheme},act=static}}' with calibration "
                        "feeds (--calib-text FILE)")
                out[key] = (st.lo, st.hi)
        return out

    def _collect_hessians(self, module: Module, uses: dict[str, list[_Use]], formats: dict[str, WeightFormat]
                          ) -> dict[str, np.ndarray]:
        """``weight -> H`` for every weight GPTQ rounds, from one float run per calibration feed."""
        func = calibration_function(module, self.context.function)
        inputs_of: dict[str, list[Value]] = {}
        for wname, ulist in uses.items():
            if wname not in formats:
                continue
            for u in ulist:
                if (u.kind == "linear" and u.fmt is not None and u.rounding == "gptq" and u.func is func
                        and formats[wname].axis is not None):
                    x = u.op.operands[0]
                    if all(x is not y for y in inputs_of.get(wname, [])):
                        inputs_of.setdefault(wname, []).append(x)
        if not inputs_of:
            return {}
        accs: dict[int, HessianAccumulator] = {}
        for xs in inputs_of.values():
            for x in xs:
                k = x.type.shape[-1]
                if not isinstance(k, int):
                    raise QirError(f"quantize{{rounding=gptq}}: %{x.name} has a symbolic feature size {k}")
                accs.setdefault(id(x), HessianAccumulator(k))

        def observe(value: Value, data: object) -> None:
            acc = accs.get(id(value))
            if acc is not None:
                acc.add(np.asarray(data), first_weight=self._sink)

        from qir.interpreter import Interpreter

        interp = Interpreter(module)
        for feed in self.context.batches("quantize{rounding=gptq}"):
            interp.run(feed, function=func.name, observer=observe)
        # Weights that read the same input (q/k/v, gate/up) share one H array: memory stays K x K per input.
        shared: dict[tuple[int, ...], np.ndarray] = {}
        out: dict[str, np.ndarray] = {}
        # Weights fed by several inputs merge raw sums first; hessian() then scales single inputs in place.
        for wname, xs in sorted(inputs_of.items(), key=lambda item: -len(item[1])):
            key = tuple(sorted(id(x) for x in xs))
            if key not in shared:
                total = accs[key[0]] if len(key) == 1 else HessianAccumulator(accs[key[0]].k)
                if len(key) > 1:
                    for vid in key:
                        total.merge(accs[vid])
                shared[key] = total.hessian()
            out[wname] = shared[key]
        return out

    def _quantize_constant(self, module: Module, wname: str, fmt: WeightFormat, ulist: list[_Use],
                           hessian: np.ndarray | None) -> None:
        """Add the quantized codes (temporary name ``<w>.q``), scale and zero point constants for ``@wname``."""
        c = module.constant(wname)
        d = dtype(fmt.dtype)
        shape = tuple(int(s) for s in c.type.shape)
        codes: np.ndarray | LazyCodes
        if fmt.axis is None:  # one scale for the whole tensor: literal parameters, no scale constant
            w = np.asarray(c.numpy(), dtype=np.float32)
            spec, scale, zp = quant.choose_params(w, d, symmetric=fmt.symmetric)
            codes = quant.quantize_spec(w, spec, d, scale, zp).codes
            final = module.fresh_constant_name(f"{wname}.q") if any(u.fmt is None for u in ulist) else wname
            qname = module.fresh_constant_name(f"{wname}.q")
            module.add_constant(qname, codes, type=TensorType.of(d, w.shape, spec), after=wname)
            self._pending[wname] = (qname, final)
            return
        if hessian is None and getattr(self, "_stream", False):
            scale, zp = streamed_params(wname, c.data, shape, fmt)
            codes = LazyCodes(c.data, shape, fmt, scale, zp)
        else:
            w = np.asarray(c.numpy(), dtype=np.float32)
            try:
                if hessian is not None:
                    codes, scale, zp = gptq_quantize(w, hessian, d, group=fmt.group, symmetric=fmt.symmetric,
                                                     damp=self.damp, block=self.block, minimum=fmt.minimum,
                                                     act_order=self.act_order)
                else:
                    codes, scale, zp = rtn_quantize(w, d, group=fmt.group, symmetric=fmt.symmetric,
                                                    minimum=fmt.minimum)
            except QirError as exc:
                raise QirError(f"quantize: weight @{wname} {c.type}: {exc}{_nonfinite_hint(w)}") from None
        keeps_float = any(u.fmt is None for u in ulist)
        final = module.fresh_constant_name(f"{wname}.q") if keeps_float else wname
        qname = module.fresh_constant_name(f"{wname}.q")
        sname = module.fresh_constant_name(f"{final}.scale")
        if fmt.minimum:  # the third array is the float minimum: the spec's offset, no zero point
            assert zp is not None and fmt.group is not None
            mname = module.fresh_constant_name(f"{final}.min")
            spec = QuantSpec(axis=1, group_size=fmt.group, scale=sname, offset=mname)
            module.add_constant(qname, codes, type=TensorType.of(d, shape, spec), after=wname)
            module.add_constant(sname, np.asarray(scale, dtype=np.float32), after=qname)
            module.add_constant(mname, np.asarray(zp, dtype=np.float32), after=sname)
            self._pending[wname] = (qname, final)
            return
        zname = module.fresh_constant_name(f"{final}.zp") if zp is not None else None
        if fmt.group is None:
            spec = QuantSpec.per_axis(0, sname, zname)
        else:
            spec = QuantSpec.per_group(1, fmt.group, sname, zname)
        module.add_constant(qname, codes, type=TensorType.of(d, shape, spec), after=wname)
        module.add_constant(sname, np.asarray(scale, dtype=np.float32), after=qname)
        if zname is not None and zp is not None:
            zdt = np.int8 if d.is_signed else np.uint8
            module.add_constant(zname, np.asarray(zp).astype(zdt), after=sname)
        self._pending[wname] = (qname, final)

    def _rewrite(self, module: Module, uses: dict[str, list[_Use]], formats: dict[str, WeightFormat],
                 stats: dict[tuple[str, str], tuple[float, float]]) -> None:
        pending = self._pending
        act_cache: dict[tuple[int, str], Value] = {}
        # Walk ops in program order per function so each shared activation is quantized before its first user.
        for func in module.functions.values():
            todo = {id(u.op): (wname, u) for wname, ulist in uses.items() if wname in formats
                    for u in ulist if u.func is func and u.fmt is not None and u.kind != "other"}
            for op in list(func.ops):
                entry = todo.get(id(op))
                if entry is None:
                    continue
                wname, u = entry
                qconst = module.constant(pending[wname][0])
                if u.kind == "embedding":
                    func.replace_op(op, "qembedding", [qconst, op.operands[1]])
                    continue
                x = op.operands[0]
                xin = x
                if u.act in ("dynamic", "static"):
                    key = (id(x), u.act)
                    xin = act_cache.get(key)  # type: ignore[assignment]
                    if xin is None:
                        xin = self._quantize_activation(func, op, x, u.act, stats.get((func.name, x.name)))
                        act_cache[key] = xin
                func.replace_op(op, "qmatmul", [xin, qconst, *op.operands[2:]])
        for wname, (qname, final) in pending.items():
            old = module.constant(wname)
            if final == wname:
                if old.uses or module.spec_references().get(wname):
                    raise QirError(f"quantize: @{wname} is still read after its users were rewritten")  # a bug
                module.remove_constant(wname)
                module.rename_constant(qname, wname)
            elif qname != final:
                module.rename_constant(qname, final)
        self._pending = {}

    @staticmethod
    def _quantize_activation(func: Function, before: Op, x: Value, act: str,
                             rng: tuple[float, float] | None) -> Value:
        k = x.type.shape[-1]
        if act == "dynamic":
            if not isinstance(k, int):
                raise QirError(f"quantize: %{x.name} has a symbolic feature size {k}; per-token quantization "
                               "needs it fixed")
            spec = QuantSpec.dynamic_spec(axis=x.type.rank - 1, group_size=k)
            t = TensorType(dtype("i8"), x.type.shape, spec)
        else:
            assert rng is not None
            scale, zp = quant.params_from_range(min(rng[0], 0.0), max(rng[1], 0.0), "u8", symmetric=False)
            assert zp is not None
            zpi = int(np.clip(zp, 0, 255))
            t = TensorType(dtype("u8"), x.type.shape, QuantSpec.per_tensor(float(scale), zpi))
        return func.add_op("quantize", [x], result_types=[t], names=[x.name + ".q"], before=before).result
