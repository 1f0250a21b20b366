"""The ``mixed-precision`` pass: choose a bit width per weight tensor under a size budget, then quantize.

``mixed-precision{budget=4.25, candidates="8,4g32,4g128,4", symmetric=true, tables=true, windows=2, report=false,
rounding=rtn|gptq, clip=minmax|mse, damp=0.01, sink=0, sensitivity=layer|output, probe=1, scales=f32|u8}``

The default candidates leave out 2-bit: on SmolLM2 the combined pipeline
``calibrate,vocab-share,mixed-precision{budget=4.25},quantize,fold-scales,dce`` reached ppl 1703 with
``"8,4,4g32,2g32"`` (the greedy start puts most tensors at 2 bits) and 46.6 with these (2 windows of GPL-3,
float 21.09). Ask for ``2g32`` explicitly to go below ~4.1 bits per parameter.

``budget`` is the average number of stored bits per parameter over every tensor the pass assigns (the weights of
``linear`` ops and, with ``tables=true``, embedding tables -- a tied embedding/head table is one tensor), counting
the codes AND the quantization parameters (f32 scales, zero points), as :func:`qir.stored_bytes` does. A candidate is
``BITS`` (one scale per output row) or ``BITSgGROUP`` (one scale per ``GROUP`` input columns), ``BITS`` in 2, 4, 8:
``"8,4,4g32,2g32"`` stores 8.06, 4.06, 5.0 and 3.0 bits per parameter for a ``[N, 576]`` weight. ``BITSgGROUPm``
stores a float minimum per group instead of a zero point (unsigned codes over the group's own range, ``quantize``'s
``zero=float``, llama.cpp's ``Q4_1``): on SmolLM2, whose weights come from a Q4_1 file, ``4g32m`` is lossless.

``scales=u8`` stores the block scales (and minimums) of every grouped format it assigns as ``compress-scales`` does
-- one byte each against an fp16 scale and base per row -- counts them so (``4g32m``: 4.5 bits per parameter
instead of 6; ``4g32`` asymmetric: 4.5 instead of 5.25) and measures each candidate's sensitivity on the values
that will be stored (compressed parameters, codes rounded again). With f32 block parameters the allocation
over-prices the grouped formats and picks 4-bit per row where a compressed 4g32 would fit.

**Sensitivity** (cheap, no extra forward passes per candidate): the output error of each layer weighted by the
input's second moment (the diagonal of the GPTQ Hessian ``E[x x^T]``), ``s(W, c) = sum_{n,k} (W~_c - W)[n,k]^2
E[x_k^2]`` -- the expected squared error the rounding adds to the layer's output per token, with ``E[x_k^2]``
measured on the first ``windows`` calibration feeds (``PassContext``, ``--calib-text FILE``) in one float run of the
calibration function. For an embedding table the lookup's error is weighted by token frequency in the same feeds,
``sum_t p_t |W~_t - W_t|^2``, plus the head term when the table is tied. A weight that only a non-calibrated function
reads uses ``E[x_k^2] = 1``.

**Allocation**: every tensor starts at its cheapest candidate; then greedily, the upgrade (to any larger candidate)
with the best sensitivity drop per extra byte that still fits in the budget is taken, until none fits. A budget
below the all-cheapest size is an error that says the minimum.

**Rounding** (``rounding``, ``clip``): each candidate is measured with the rounding that will be stored.
``clip=mse`` chooses every scale (and zero point) for the least squared error over clipped ranges
(:func:`qir.quant.choose_params_mse`) instead of the min/max range. ``rounding=gptq`` rounds linear weights with
GPTQ (:mod:`qir.passes.gptq`, dampening ``damp``, first positions counted ``sink`` times as in ``quantize``) against
the full input Hessian ``H = 2/n X^T X`` of the first ``windows`` calibration feeds, and the sensitivity becomes
the exact expected output error of that rounding, ``s(W, c) = 1/2 tr(dW H dW^T)`` with ``dW = W~_c - W`` (GPTQ
moves error into directions the inputs do not excite, which the diagonal would not see); tables stay
round-to-nearest. The quantized candidates are kept between
:meth:`MixedPrecision.measure` and :meth:`MixedPrecision.assign` (GPTQ runs once per tensor and candidate). On
all-MiniLM-L6-v2 (``bench/ort_minilm.py --small``) ``rounding=gptq,clip=mse`` is what lifts 4-bit linears from
cosine 0.90 towards 0.95.

**End-to-end sensitivity** (``sensitivity=output``): instead of each layer's own output error, run the calibrated
function on the first ``probe`` feeds with ONE tensor replaced by its dequantized candidate and take the mean
squared error of the function's outputs against the float run -- ``tensors x candidates`` extra runs of the
interpreter. Errors grow differently through the network (on all-MiniLM-L6-v2 a 4-bit value projection costs 40x
more sentence cosine in layer 5 than in layer 0 at a similar layer-output error), which the layer proxy cannot see;
the greedy allocation then spends bytes where the final output needs them.

The result is written directly as quantized constants (RTN or GPTQ, f32 scales, the constant keeps the
float weight's name, as ``quantize`` does): ``linear`` -> ``qmatmul``, ``embedding`` -> ``qembedding``, weight-only
(float activations). A following ``quantize`` only sees what is left float. ``self.assignment`` holds one
:class:`Assignment` per tensor (weight, format, bits per parameter, bytes, sensitivity); ``report=true`` prints that
table and the totals. :meth:`MixedPrecision.measure` and :meth:`MixedPrecision.assign` split the work, so one
measurement serves several budgets.

Before::

    const @w1 : f32[3,64] = dense(...)
    func @main(%x: f32[1,seq,64]) -> (f32[1,seq,3]) {
      %h = linear %x, @w1 : f32[1,seq,3]
      return %h
    }

After ``mixed-precision{budget=5,candidates="8,4g32"}`` (the 8-bit per-row format would cost 8.5 bits per parameter
for this small weight, over budget)::

    const @w1 : i4[3,64] q(axis=1, group=32, scale=@w1.scale) = dense(...)
    const @w1.scale : f32[3,2] = dense(...)
    func @main(%x: f32[1,seq,64]) -> (f32[1,seq,3]) {
      %h = qmatmul %x, @w1 : f32[1,seq,3]
      return %h
    }
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from qir import quant
from qir.dtypes import dtype
from qir.errors import QirError
from qir.graph import Constant, Function, Module, Op, Value
from qir.passes.base import Pass
from qir.passes.calibrate import calibration_function
from qir.passes.compress_scales import compress_constant, compressed_values
from qir.passes.gptq import HessianAccumulator, gptq_quantize, rtn_quantize, sink_weight
from qir.passes.registry import register_pass
from qir.quantspec import QuantSpec
from qir.types import TensorType

__all__ = ["Assignment", "Candidate", "MixedPrecision", "allocate", "parse_candidates"]


@dataclass(frozen=True)
class Candidate:
    """One storage format: ``bits`` per code, one scale per row (``group=None``) or per ``group`` input columns;
    ``minimum``: a float minimum per group instead of a zero point (unsigned codes, llama.cpp's ``Q4_1``)."""

    bits: int
    group: int | None
    minimum: bool = False

    def __str__(self) -> str:
        return (f"{self.bits}" if self.group is None else f"{self.bits}g{self.group}") + ("m" if self.minimum else "")

    def nbytes(self, n: int, k: int, symmetric: bool, scales: str = "f32") -> int:
        """Stored bytes of an ``[n, k]`` weight: packed codes, block parameters and (asymmetric) 1-byte zero points.

        ``scales="u8"``: the block scales (and minimums) of a grouped format as ``compress-scales`` stores them, one
        byte each plus an fp16 scale and base per row; otherwise f32.
        """
        groups = 1 if self.group is None else -(-k // self.group)
        nparams = 2 if self.minimum else 1
        zp = 0 if (symmetric or self.minimum) else n * groups
        if scales == "u8" and self.group is not None:
            params = n * groups * nparams + n * nparams * 4
        else:
            params = n * groups * nparams * 4
        return -(-n * k * self.bits // 8) + params + zp

    def dtype(self, symmetric: bool) -> str:
        """The code dtype: unsigned with a zero point or a minimum, signed when symmetric."""
        return f"{'i' if symmetric and not self.minimum else 'u'}{self.bits}"


@dataclass
class Assignment:
    """The format chosen for one weight tensor and what it costs."""

    weight: str
    params: int
    fmt: Candidate
    nbytes: int
    sensitivity: float
    options: dict[Candidate, tuple[int, float]] = field(default_factory=dict, repr=False)

    @property
    def bits(self) -> float:
        return 8.0 * self.nbytes / self.params


def parse_candidates(text: str) -> list[Candidate]:
    """``"8,4,4g32,4g32m,2g32"`` as candidates (bits 2, 4 or 8; an optional group size; ``m``: a float minimum)."""
    out: list[Candidate] = []
    for item in (t.strip() for t in text.replace(":", ",").split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:g(\d+)(m?))?", item)
        if m is None or int(m.group(1)) not in (2, 4, 8) or (m.group(2) is not None and int(m.group(2)) < 1):
            raise QirError(f"mixed-precision: candidate {item!r} must be BITS, BITSgGROUP or BITSgGROUPm with BITS "
                           "2, 4 or 8 (e.g. 8, 4g32, 4g32m: a float minimum per group)")
        c = Candidate(int(m.group(1)), None if m.group(2) is None else int(m.group(2)), bool(m.group(3)))
        if c not in out:
            out.append(c)
    if not out:
        raise QirError("mixed-precision: candidates is empty; give e.g. candidates=\"8,4,4g32,2g32\"")
    return out


def allocate(options: dict[str, dict[Candidate, tuple[int, float]]], budget_bytes: float, *, params: int = 0
             ) -> dict[str, Candidate]:
    """Greedy marginal-gain allocation: cheapest everywhere, then the best sensitivity drop per byte that fits."""
    choice = {w: min(opts, key=lambda c: (opts[c][0], opts[c][1])) for w, opts in options.items()}
    used = sum(options[w][c][0] for w, c in choice.items())
    if used > budget_bytes:
        raise QirError(f"mixed-precision: the budget ({budget_bytes:.0f} bytes) is below the smallest assignment "
                       f"({used} bytes with the cheapest candidate everywhere"
                       + (f", {8.0 * used / params:.3f} bits/param" if params else "")
                       + "); raise budget or add a smaller candidate")
    while True:
        best: tuple[float, str, Candidate] | None = None
        for w, opts in options.items():
            b0, s0 = opts[choice[w]]
            for c, (b, s) in opts.items():
                if b <= b0 or s >= s0 or used + b - b0 > budget_bytes:
                    continue
                gain = (s0 - s) / (b - b0)
                if best is None or gain > best[0]:
                    best = (gain, w, c)
        if best is None:
            return choice
        _, w, c = best
        used += options[w][c][0] - options[w][choice[w]][0]
        choice[w] = c


def _checksum(w: np.ndarray) -> int:
    """A cheap fingerprint of a weight's data: a cached quantization is reused only for the same numbers."""
    return zlib.crc32(np.ascontiguousarray(w, dtype=np.float32).view(np.uint8))


def _spec(c: Candidate, symmetric: bool, scale_name: str = "scale", zp_name: str | None = None,
          min_name: str = "min") -> QuantSpec:
    if c.minimum:
        assert c.group is not None
        return QuantSpec(axis=1, group_size=c.group, scale=scale_name, offset=min_name)
    zp = None if symmetric else (zp_name or "zero_point")
    return QuantSpec.per_axis(0, scale_name, zp) if c.group is None else QuantSpec.per_group(1, c.group, scale_name,
                                                                                            zp)


def _quantize(w: np.ndarray, c: Candidate, symmetric: bool, clip: str = "minmax",
              hessian: np.ndarray | None = None, damp: float = 0.01) -> quant.QTensor:
    """``w`` stored as candidate ``c``: round to nearest (min/max or MSE-clipped scales) or GPTQ given ``hessian``.

    A float-minimum candidate always takes its group's min/max range (``clip=mse`` chooses integer zero points).
    """
    d = dtype(c.dtype(symmetric))
    spec = _spec(c, symmetric)
    if c.minimum:
        if hessian is not None:
            codes, scale, low = gptq_quantize(w, hessian, d, group=c.group, symmetric=False, damp=damp, minimum=True)
        else:
            codes, scale, low = rtn_quantize(w, d, group=c.group, symmetric=False, minimum=True)
        return quant.QTensor(codes, np.asarray(scale, np.float32), None, spec, np.asarray(low, np.float32))
    if hessian is not None:
        codes, scale, zp = gptq_quantize(w, hessian, d, group=c.group, symmetric=symmetric, damp=damp, clip=clip)
        return quant.QTensor(codes, scale, zp, spec)
    choose = quant.choose_params_mse if clip == "mse" else quant.choose_params
    if c.group is None:
        _, scale, zp = choose(w, d, symmetric=symmetric, axis=0)
    else:
        _, scale, zp = choose(w, d, symmetric=symmetric, axis=1, group_size=c.group)
    return quant.quantize_spec(w, spec, d, scale, zp)


class _OutputProbe:
    """The calibrated function's output error with one constant's data swapped for its dequantized candidate."""

    def __init__(self, module: Module, func: Function, feeds: list[dict[str, np.ndarray]]) -> None:
        self.module, self.func, self.feeds = module, func, feeds
        self.ref = [self._outputs(feed) for feed in feeds]

    def _outputs(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        from qir.interpreter import Interpreter

        outs = Interpreter(self.module).run(feed, function=self.func.name)
        return [np.asarray(o.dequantize() if isinstance(o, quant.QTensor) else o, np.float64) for o in outs]

    def error(self, const: Constant, approx: np.ndarray) -> float:
        """Mean squared output error (summed over outputs, averaged over feeds) with ``const`` holding ``approx``."""
        saved = const.data
        const.data = np.asarray(approx, dtype=np.float32)
        try:
            total = 0.0
            for feed, ref in zip(self.feeds, self.ref, strict=True):
                total += sum(float(np.mean(np.square(o - r))) for o, r in zip(self._outputs(feed), ref, strict=True))
        finally:
            const.data = saved
        return total / max(len(self.feeds), 1)


@register_pass
@dataclass
class MixedPrecision(Pass):
    """Per-tensor bit widths under an average bits-per-parameter budget (sensitivity-guided), then quantize them."""

    name = "mixed-precision"
    budget: float = 4.25
    candidates: str = "8,4g32,4g128,4"
    symmetric: bool = True
    tables: bool = True
    windows: int = 2
    report: bool = False
    rounding: Literal["rtn", "gptq"] = "rtn"
    clip: Literal["minmax", "mse"] = "minmax"
    damp: float = 0.01
    sink: float = 0.0
    sensitivity: Literal["layer", "output"] = "layer"
    probe: int = 1
    scales: Literal["f32", "u8"] = "f32"

    def run(self, module: Module) -> None:
        self.assign(module, self.measure(module))

    def _check(self) -> None:
        if self.rounding not in ("rtn", "gptq"):
            raise QirError(f"mixed-precision: rounding must be rtn or gptq, got {self.rounding!r}")
        if self.clip not in ("minmax", "mse"):
            raise QirError(f"mixed-precision: clip must be minmax or mse, got {self.clip!r}")
        if self.scales not in ("f32", "u8"):
            raise QirError(f"mixed-precision: scales must be f32 or u8, got {self.scales!r}")
        if self.sensitivity not in ("layer", "output"):
            raise QirError(f"mixed-precision: sensitivity must be layer or output, got {self.sensitivity!r}")

    def measure(self, module: Module) -> dict[str, dict[Candidate, tuple[int, float]]]:
        """``weight -> {candidate: (stored bytes, sensitivity)}`` for every tensor the pass assigns."""
        self._check()
        cands = parse_candidates(self.candidates)
        uses = self._weights(module)
        self._qcache: dict[tuple[str, Candidate], tuple[int, quant.QTensor]] = {}
        if not uses:
            return {}
        second, freq, hess = self._moments(module, uses)
        func = calibration_function(module, self.context.function)
        options: dict[str, dict[Candidate, tuple[int, float]]] = {}
        probe = _OutputProbe(module, func, list(self.context.batches("mixed-precision{sensitivity=output}"))[
            : max(self.probe, 1)]) if self.sensitivity == "output" else None
        from qir.tools.progress import progress

        for wname, ulist in progress(uses.items(), "mixed-precision: sensitivity"):
            w = np.asarray(module.constant(wname).numpy(), dtype=np.float32)
            n, k = w.shape
            # one function's uses (the calibrated one when it reads the weight): prefill + decode would count twice
            mine = [u for u in ulist if u[1] is func] or [u for u in ulist if u[1] is ulist[0][1]]
            options[wname] = {}
            for c in cands:
                full = self._hessian(hess, mine)
                qt = _quantize(w, c, self.symmetric, self.clip, full, self.damp)
                self._qcache[(wname, c)] = (_checksum(w), qt)
                approx = self._stored_values(qt, c)
                diff = approx - w
                err2 = np.square(diff)
                sens = 0.0
                for kind, _func, op in mine:
                    if kind == "linear" and full is not None:
                        # 1/2 tr(dW H dW^T) = E|dW x|^2 per token: what GPTQ minimizes, off-diagonal terms included
                        sens += 0.5 * float(np.einsum("nk,nk->", diff @ full, diff))
                    elif kind == "linear":
                        h = second.get(id(op.operands[0]))
                        sens += float(err2.sum(axis=0) @ (h if h is not None else np.ones(k)))
                    else:
                        p = freq.get(wname)
                        rows = err2.sum(axis=1)
                        sens += float(rows @ p) if p is not None else float(rows.mean())
                if self.sensitivity == "output":
                    sens = probe.error(module.constant(wname), approx)
                options[wname][c] = (c.nbytes(n, k, self.symmetric, self.scales), sens)
        return options

    def _stored_values(self, qt: quant.QTensor, c: Candidate) -> np.ndarray:
        """What candidate ``c`` of a weight dequantizes to as stored: with ``scales=u8`` its block parameters are
        compressed (and the codes rounded again) as ``compress-scales`` does."""
        if self.scales == "u8" and c.group is not None:
            return compressed_values(qt, c.dtype(self.symmetric))
        return qt.dequantize()

    @staticmethod
    def _hessian(hess: dict[int, np.ndarray], mine: list[tuple[str, Function, Op]]) -> np.ndarray | None:
        """The Hessian of a weight's (calibrated) linear input, or None (RTN, or a table, or not calibrated)."""
        for kind, _func, op in mine:
            if kind == "linear" and id(op.operands[0]) in hess:
                return hess[id(op.operands[0])]
        return None

    def assign(self, module: Module, options: dict[str, dict[Candidate, tuple[int, float]]]) -> None:
        """Allocate the budget over ``options`` (from :meth:`measure`, maybe of another copy) and quantize.

        The candidates :meth:`measure` quantized are reused when their weight still holds the same data; otherwise
        (another module, or ``rounding=gptq`` after a new module was measured) they are quantized again here.
        """
        self._check()
        uses = self._weights(module)
        missing = sorted(set(options) - set(uses))
        if missing:
            raise QirError(f"mixed-precision: measured weights {', '.join('@' + w for w in missing[:3])} are not "
                           "float linear weights / tables of this module")
        params = {w: int(np.prod(module.constant(w).type.shape)) for w in options}
        total_params = sum(params.values())
        choice = allocate(options, self.budget * total_params / 8.0, params=total_params) if options else {}
        self.assignment: list[Assignment] = [
            Assignment(w, params[w], c, options[w][c][0], options[w][c][1], options[w]) for w, c in choice.items()]
        cache: dict[tuple[str, Candidate], tuple[int, quant.QTensor]] = getattr(self, "_qcache", {})
        hess: dict[int, np.ndarray] = {}
        if self.rounding == "gptq" and any((a.weight, a.fmt) not in cache for a in self.assignment):
            hess = self._moments(module, uses)[2]
        func = calibration_function(module, self.context.function) if hess else None
        for a in self.assignment:
            w = np.asarray(module.constant(a.weight).numpy(), dtype=np.float32)
            hit = cache.get((a.weight, a.fmt))
            qt = hit[1] if hit is not None and hit[0] == _checksum(w) and hit[1].codes.shape == w.shape else None
            if qt is None:
                ulist = uses[a.weight]
                mine = [u for u in ulist if u[1] is func] or ulist
                qt = _quantize(w, a.fmt, self.symmetric, self.clip, self._hessian(hess, mine), self.damp)
            self._apply(module, a, uses[a.weight], qt)
        if self.report:
            print(self.table())

    def table(self) -> str:
        """The assignment as text: one row per tensor, then the totals."""
        lines = [f"{'weight':60s} {'fmt':>6s} {'bits':>6s} {'bytes':>10s} {'sensitivity':>12s}"]
        for a in self.assignment:
            lines.append(f"{a.weight:60s} {a.fmt!s:>6s} {a.bits:6.2f} {a.nbytes:10d} {a.sensitivity:12.4g}")
        nbytes = sum(a.nbytes for a in self.assignment)
        params = sum(a.params for a in self.assignment)
        counts: dict[str, int] = {}
        for a in self.assignment:
            counts[str(a.fmt)] = counts.get(str(a.fmt), 0) + 1
        lines.append(f"total: {len(self.assignment)} tensors, {params} parameters, {nbytes} bytes, "
                     f"{8.0 * nbytes / max(params, 1):.3f} bits/param (budget {self.budget}); formats "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)

    # -- what to assign -----------------------------------------------------------------------------------------
    def _weights(self, module: Module) -> dict[str, list[tuple[str, Function, Op]]]:
        """Constant weights whose every use is a linear weight (or, with ``tables``, an embedding table)."""
        out: dict[str, list[tuple[str, Function, Op]]] = {}
        for c in module.constants.values():
            t = c.type
            if t.quant is not None or not t.dtype.is_float or t.rank != 2 or not c.uses:
                continue
            if not all(isinstance(d, int) for d in t.shape):
                continue
            ulist: list[tuple[str, Function, Op]] = []
            for op, index in c.uses:
                if op.opcode == "linear" and index == 1:
                    ulist.append(("linear", op.parent, op))
                elif op.opcode == "embedding" and index == 0 and self.tables:
                    ulist.append(("embedding", op.parent, op))
                else:
                    break
            else:
                if not c.has_data:
                    raise QirError(f"mixed-precision: weight @{c.name} has no data (the .qir text was read without "
                                   "its .safetensors file); load the module with qir.load")
                out[c.name] = ulist
        return out

    def _moments(self, module: Module, uses: dict[str, list[tuple[str, Function, Op]]]
                 ) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray], dict[int, np.ndarray]]:
        """``E[x_k^2]`` per linear input (by value id), token frequencies per table and, with ``rounding=gptq``,
        the Hessian ``2/n X^T X`` per linear input, from the calibration feeds."""
        func = calibration_function(module, self.context.function)
        sink = sink_weight(module, self.sink, "mixed-precision")
        feeds = list(self.context.batches("mixed-precision (sensitivities)"))[: max(self.windows, 1)]
        watch: dict[int, Value] = {}
        ids_of: dict[str, set[str]] = {}
        for wname, ulist in uses.items():
            for kind, f, op in ulist:
                if f is not func:
                    continue
                if kind == "linear":
                    watch[id(op.operands[0])] = op.operands[0]
                elif not op.operands[1].is_constant:
                    ids_of.setdefault(wname, set()).add(op.operands[1].name)
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        accs: dict[int, HessianAccumulator] = {}
        if self.rounding == "gptq":
            for vid, v in watch.items():
                k = v.type.shape[-1]
                if not isinstance(k, int):
                    raise QirError(f"mixed-precision{{rounding=gptq}}: %{v.name} has a symbolic feature size {k}")
                accs[vid] = HessianAccumulator(k)

        def observe(value: Value, data: object) -> None:
            if id(value) not in watch:
                return
            x = data.dequantize() if isinstance(data, quant.QTensor) else np.asarray(data)
            x2 = np.square(np.asarray(x, np.float64)).reshape(-1, x.shape[-1])
            sums[id(value)] = sums.get(id(value), 0) + x2.sum(axis=0)
            counts[id(value)] = counts.get(id(value), 0) + x2.shape[0]
            if id(value) in accs:
                accs[id(value)].add(x, first_weight=sink)

        from qir.interpreter import Interpreter

        interp = Interpreter(module)
        from qir.tools.progress import progress

        for feed in progress(feeds, "mixed-precision: input moments"):
            interp.run(feed, function=func.name, observer=observe)
        second = {vid: sums[vid] / counts[vid] for vid in sums}
        # decode's linears read other values than prefill's: give them the moments of the same weight's input
        for ulist in uses.values():
            known = [second[id(op.operands[0])] for kind, _f, op in ulist
                     if kind == "linear" and id(op.operands[0]) in second]
            for kind, _f, op in ulist:
                if kind == "linear" and known and id(op.operands[0]) not in second:
                    second[id(op.operands[0])] = known[0]
        freq: dict[str, np.ndarray] = {}
        for wname, names in ids_of.items():
            vocab = int(module.constant(wname).type.shape[0])
            cnt = np.zeros(vocab, np.float64)
            for feed in feeds:
                for name in names:
                    if name in feed:
                        ids = np.asarray(feed[name]).reshape(-1).astype(np.int64)
                        cnt += np.bincount(ids[(ids >= 0) & (ids < vocab)], minlength=vocab)
            if cnt.sum() > 0:
                freq[wname] = cnt / cnt.sum()
        hess = {vid: acc.hessian() for vid, acc in accs.items() if acc.rows}
        return second, freq, hess

    # -- rewrite ------------------------------------------------------------------------------------------------
    def _apply(self, module: Module, a: Assignment, ulist: list[tuple[str, Function, Op]], qt: quant.QTensor
               ) -> None:
        wname = a.weight
        w_shape = tuple(int(s) for s in module.constant(wname).type.shape)
        qname = module.fresh_constant_name(f"{wname}.q")
        sname = module.fresh_constant_name(f"{wname}.scale")
        zname = None if self.symmetric or a.fmt.minimum else module.fresh_constant_name(f"{wname}.zp")
        mname = module.fresh_constant_name(f"{wname}.min") if a.fmt.minimum else "min"
        d = dtype(a.fmt.dtype(self.symmetric))
        spec = _spec(a.fmt, self.symmetric, sname, zname, mname)
        qc = module.add_constant(qname, qt.codes, type=TensorType.of(d, w_shape, spec), after=wname)
        module.add_constant(sname, np.asarray(qt.scale, np.float32), after=qname)
        if a.fmt.minimum:
            module.add_constant(mname, np.asarray(qt.offset, np.float32), after=sname)
        if zname is not None:
            module.add_constant(zname, np.asarray(qt.zero_point).astype(np.int8 if d.is_signed else np.uint8),
                                after=sname)
        for kind, func, op in ulist:
            operands = [qc, op.operands[1]] if kind == "embedding" else [op.operands[0], qc, *op.operands[2:]]
            func.replace_op(op, "qembedding" if kind == "embedding" else "qmatmul", operands)
        module.remove_constant(wname)
        module.rename_constant(qname, wname)
        if self.scales == "u8" and a.fmt.group is not None:
            compress_constant(module, qc, spec)

