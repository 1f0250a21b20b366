"""``qir debug compare``: run two things that compute the same model on the same inputs and compare every
intermediate tensor they share, matched by IR value name.

A side is a :class:`~qir.debug.sources.TensorSource` (a float or quantized ``.qir``, an artifact folder). For each
feed, side A runs first and hands over the tensors that side B also computes; they wait in a
:class:`SpillStore` (memory up to a budget, then ``.npy`` files in a temporary folder); then side B runs and each
of its tensors is compared with A's the moment it exists, and A's copy is dropped. Nothing holds every
activation of the model at once; statistics accumulate over feeds (:class:`~qir.debug.metrics.TensorStats`).

Attribution. A tensor's *input SQNR* is the lowest SQNR among the matched values its producer reads (looking
through values only one side has, such as ``%x.q``, to what they are computed from); a value read by nothing
matched -- a function input, or an embedding lookup on exact token ids -- has input SQNR ``inf``. Its *SQNR drop*
is input SQNR minus its own SQNR, an ``inf`` input counting as :data:`CLEAN_DB` (or as the output's SQNR when that
is higher: float rounding differences between runtimes stay near 0), so a first lossy op gets a finite drop.
``worst`` is the tensor with the largest drop: the place where the error jumps. The text output lists the tensors
ranked by drop, then the first tensor in graph order under 20 dB.

Reading the ranking: in LLMs a norm right after a broken layer can rank high too (``rms_norm`` of the residual
stream): a few huge outlier channels dominate the residual's power, so an error that is small against them is
large against the normalized output. The op that *introduced* the error is the one whose inputs were clean.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qir.debug.metrics import TensorStats
from qir.debug.sources import DebugError, TensorSource
from qir.quant import QTensor

__all__ = ["CLEAN_DB", "CompareResult", "SpillStore", "TensorReport", "compare_sources", "default_feeds"]

#: SQNR (dB) an exact input counts as when computing a drop: well above what any 8-bit step leaves (~40-50 dB).
CLEAN_DB = 60.0


@dataclass(frozen=True)
class TensorReport:
    """One matched tensor: its error statistics and how much error it adds relative to its inputs."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_err: float
    input_sqnr_db: float
    drop_db: float
    integer: bool
    exact: bool | None
    elements: int
    note: str = ""
    weights: tuple[str, ...] = ()  # constants the producing op reads (names the layer)
    exact_fraction: float = 1.0    # integer tensors: share of equal elements
    max_code_diff: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "sqnr_db": self.sqnr_db, "cosine": self.cosine,
                             "max_abs_err": self.max_abs_err, "input_sqnr_db": self.input_sqnr_db,
                             "sqnr_drop_db": self.drop_db}
        if self.weights:
            d["weights"] = list(self.weights)
        if self.integer:
            d["exact"] = self.exact
            d["exact_fraction"] = self.exact_fraction
            d["max_code_diff"] = self.max_code_diff
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class CompareResult:
    """Everything ``qir debug compare`` reports; ``tensors`` are in graph order."""

    label_a: str
    label_b: str
    tensors: list[TensorReport]
    names_a: int
    names_b: int
    feeds: int
    worst: str | None
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.tensors)

    @property
    def integer_tensors(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.integer]

    def to_json(self) -> dict[str, Any]:
        ints = self.integer_tensors
        return {"a": self.label_a, "b": self.label_b, "feeds": self.feeds,
                "matched": self.matched, "values_a": self.names_a, "values_b": self.names_b,
                "integer_tensors": len(ints), "integer_exact": sum(1 for t in ints if t.exact),
                "tensors": [t.to_json() for t in self.tensors], "worst": self.worst}

    def ranked(self) -> list[TensorReport]:
        """Tensors by SQNR drop, largest first (ties in graph order)."""
        order = {t.name: i for i, t in enumerate(self.tensors)}
        return sorted(self.tensors, key=lambda t: (-_finite(t.drop_db), order[t.name]))

    def format(self, *, top: int = 15, all_tensors: bool = False) -> str:
        ints = self.integer_tensors
        lines = [f"compared {self.label_a} (A, reference) with {self.label_b} (B) on {self.feeds} feed(s)",
                 f"matched {self.matched} of {self.names_b} values B computes by name "
                 f"(A computes {self.names_a}; {len(self.only_a)} only in A, {len(self.only_b)} only in B)"]
        if ints:
            bad = [t for t in ints if not t.exact]
            lines.append(f"integer tensors: {len(ints) - len(bad)} of {len(ints)} match exactly"
                         + (f"; differ: {', '.join(t.name for t in bad[:8])}{' ...' if len(bad) > 8 else ''}"
                            if bad else ""))
            if bad:
                # Codes quantized from float inputs that already differ (finite input SQNR) can land on the other
                # side of a rounding tie, or get another per-token scale; codes from equal inputs must be equal.
                drift = [t for t in bad if math.isfinite(t.input_sqnr_db)]
                real = [t for t in bad if t not in drift]
                if drift:
                    lines.append(f"  {len(drift)} of them are quantized from float inputs that already differ: "
                                 f"at least {100 * min(t.exact_fraction for t in drift):.3f}% of elements equal, "
                                 f"codes off by at most {max(t.max_code_diff for t in drift)}")
                if real:
                    lines.append(f"  {len(real)} differ although their inputs are equal (an integer-path difference): "
                                 + ", ".join(t.name for t in real[:8]))
        if not self.tensors:
            return "\n".join(lines) + "\n"
        lines.append(f"worst (largest SQNR drop against its inputs): {self.worst}")
        head = f"{'':2}{'tensor':48s} {'SQNR dB':>9s} {'in dB':>8s} {'drop':>8s} {'cosine':>10s} {'max|err|':>10s}"
        rows = self.tensors if all_tensors else self.ranked()[:top]
        lines.append("all tensors in graph order:" if all_tensors else f"top {len(rows)} by SQNR drop:")
        lines.append(head)
        lines.extend(_row(t, t.name == self.worst) for t in rows)
        first = next((t for t in self.tensors if t.sqnr_db < 20.0), None)
        if first is not None:
            lines.append(f"first tensor in graph order under 20 dB: {first.name} ({first.sqnr_db:.1f} dB)")
        return "\n".join(lines) + "\n"


def _finite(x: float) -> float:
    if math.isnan(x):
        return -math.inf
    return x


def _row(t: TensorReport, mark: bool) -> str:
    name = t.name if len(t.name) <= 48 else "..." + t.name[-45:]
    ex = "" if t.exact is None else ("  exact" if t.exact else f"  INTEGER MISMATCH ({100 * t.exact_fraction:.3f}% "
                                                                f"equal, max |diff| {t.max_code_diff})")
    return (f"{'*' if mark else ' '} {name:48s} {t.sqnr_db:9.2f} {t.input_sqnr_db:8.2f} {t.drop_db:8.2f} "
            f"{t.cosine:10.6f} {t.max_abs_err:10.3g}{ex}{('  ' + t.note) if t.note else ''}"
            f"{('  @' + t.weights[0]) if t.weights else ''}")


class SpillStore:
    """Named runtime values kept until taken: in memory up to ``budget`` bytes, then as ``.npy`` files."""

    def __init__(self, budget: int = 512 << 20) -> None:
        self.budget = budget
        self.in_memory = 0
        self._mem: dict[str, Any] = {}
        self._disk: dict[str, tuple[Path, Any]] = {}
        self._dir: Path | None = None
        self.spilled = 0

    def put(self, name: str, value: Any) -> None:
        size = _nbytes(value)
        if self.in_memory + size <= self.budget:
            self._mem[name] = value
            self.in_memory += size
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="qir-debug-"))
        path = self._dir / f"{len(self._disk) + self.spilled}.npy"
        if isinstance(value, QTensor):
            np.save(path, value.codes)
            meta: Any = (value.scale, value.zero_point, value.spec)
        else:
            np.save(path, np.asarray(value))
            meta = None
        self._disk[name] = (path, meta)
        self.spilled += 1

    def take(self, name: str) -> Any | None:
        if name in self._mem:
            value = self._mem.pop(name)
            self.in_memory -= _nbytes(value)
            return value
        if name in self._disk:
            path, meta = self._disk.pop(name)
            arr = np.load(path)
            path.unlink()
            return arr if meta is None else QTensor(arr, *meta)
        return None

    def close(self) -> None:
        self._mem.clear()
        self._disk.clear()
        self.in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _nbytes(value: Any) -> int:
    return int(value.codes.nbytes if isinstance(value, QTensor) else np.asarray(value).nbytes)


def default_feeds(src: TensorSource, *, text: str | Path | None = None, windows: int = 1, seq: int = 256,
                  batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Inputs for ``src``'s function: LM windows of ``seq`` tokens of ``text``; encoder sentences in batches.

    Causal LMs need ``text``. Encoders use :data:`qir.evaluate.DEFAULT_SENTENCES` (or the lines of ``text``),
    ``batch`` sentences per feed, at most ``windows`` feeds.
    """
    names = src.input_names()
    tok = src.tokenizer
    if src.kind == "causal-lm":
        if text is None:
            raise DebugError("a causal LM needs text to run on: give --calib-text FILE (e.g. "
                             "/usr/share/common-licenses/Apache-2.0) or --inputs FILE.npz")
        from qir.evaluate import read_text, window_ids

        ids = tok(read_text(text), add_special_tokens=False)["input_ids"]
        return [{names[0]: np.asarray([w], dtype=np.int64)} for w in window_ids(ids, window=seq,
                                                                                max_windows=windows)]
    if src.kind == "encoder":
        from qir.evaluate import DEFAULT_SENTENCES, read_text

        lines: Sequence[str] = DEFAULT_SENTENCES
        if text is not None:
            lines = [ln.strip() for ln in read_text(text).splitlines() if ln.strip()]
        lines = list(lines)[: windows * batch]
        feeds = []
        for i in range(0, len(lines), batch):
            enc = tok(lines[i:i + batch], padding=True, truncation=True, max_length=seq, return_tensors="np")
            feeds.append({names[0]: enc["input_ids"].astype(np.int64),
                          names[1]: enc["attention_mask"].astype(np.int64)})
        return feeds
    raise DebugError(f"{src.label}: a model of kind {src.kind!r}; give its inputs with --inputs FILE.npz")


def load_npz_feed(path: str | Path, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One feed from an ``.npz`` file holding an array per input name."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DebugError(f"--inputs {path}: cannot read ({exc})") from None
    missing = [n for n in names if n not in data]
    if missing:
        raise DebugError(f"--inputs {path}: no array for input(s) {missing}; it has {sorted(data)}")
    return [{n: data[n] for n in names}]


def compare_sources(a: TensorSource, b: TensorSource, feeds: Sequence[dict[str, np.ndarray]], *,
                    memory_budget: int = 512 << 20) -> CompareResult:
    """Compare every value ``a`` and ``b`` both compute, on each of ``feeds``; ``a`` is the reference."""
    if list(a.input_names()) != list(b.input_names()):
        raise DebugError(f"the two sides take different inputs: {a.label} {a.input_names()} vs {b.label} "
                         f"{b.input_names()}")
    names_a, names_b = a.value_names(), b.value_names()
    set_b = set(names_b)
    shared = [n for n in names_a if n in set_b]
    wanted = set(shared)
    stats: dict[str, TensorStats] = {n: TensorStats(n) for n in shared}
    store = SpillStore(memory_budget)
    try:
        for feed in feeds:
            a.stream(feed, wanted, store.put)

            def on_b(name: str, value: Any) -> None:
                ref = store.take(name)
                if ref is not None:
                    stats[name].add(ref, value)

            b.stream(feed, wanted, on_b)
            store.close()
    finally:
        store.close()
    reads = _graph_reads(a, b)
    consts: dict[str, list[str]] = {}
    for side in (a, b):
        fn = getattr(side, "constants_of", None)  # optional in the protocol: sources that know the weights
        if fn is not None:
            consts.update(fn())
    reports = _attribute([stats[n] for n in shared], reads, consts)
    worst = max(reports, key=lambda t: _finite(t.drop_db)).name if reports else None
    if reports and all(t.drop_db <= 0 or math.isnan(t.drop_db) for t in reports):
        worst = min(reports, key=lambda t: _finite(t.sqnr_db)).name if any(
            math.isfinite(t.sqnr_db) for t in reports) else None
    return CompareResult(a.label, b.label, reports, len(names_a), len(names_b), len(feeds), worst,
                         only_a=[n for n in names_a if n not in set_b],
                         only_b=[n for n in names_b if n not in wanted])


def _weights(names: list[str]) -> list[str]:
    """The weight constants among an op's constants (not its scales, zero points or calibration statistics)."""
    return [n for n in names if n.endswith("weight") or n.endswith("weight.q")] or names[:1]


def _drop(in_db: float, sq: float) -> float:
    """SQNR lost from the inputs to the output; exact inputs count as CLEAN_DB (or as the output, if cleaner)."""
    if math.isnan(sq):
        return math.nan
    if sq == math.inf:
        return 0.0
    if in_db == math.inf:
        in_db = max(CLEAN_DB, sq)
    return in_db - sq


def _graph_reads(a: TensorSource, b: TensorSource) -> dict[str, list[str]]:
    """Producer inputs per value: B's graph (the transformed one, which has the extra values), then A's."""
    reads = dict(a.inputs_of())
    reads.update(b.inputs_of())
    return reads


def _attribute(stats: list[TensorStats], reads: dict[str, list[str]], consts: dict[str, list[str]]
               ) -> list[TensorReport]:
    by_name = {s.name: s for s in stats}

    def matched_inputs(name: str) -> Iterator[str]:
        seen: set[str] = set()
        stack = list(reads.get(name, []))
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in by_name:
                yield n
            else:
                stack.extend(reads.get(n, []))

    out = []
    for s in stats:
        ins = [by_name[n].sqnr_db for n in matched_inputs(s.name)]
        in_db = min(ins) if ins else math.inf
        note = ""
        if s.shape_mismatch:
            note = f"shape {s.shape_mismatch}"
        elif s.nonfinite:
            note = f"{s.nonfinite} non-finite element(s) left out"
        sq = s.sqnr_db if not s.shape_mismatch else math.nan
        drop = _drop(in_db, sq)
        out.append(TensorReport(s.name, sq, s.cosine if not s.shape_mismatch else math.nan,
                                s.max_abs_err if not s.shape_mismatch else math.nan, in_db, drop, s.integer,
                                s.exact, s.elements, note, tuple(_weights(consts.get(s.name, []))),
                                s.exact_elements / s.elements if s.elements else 1.0, s.max_code_diff))
    return out
