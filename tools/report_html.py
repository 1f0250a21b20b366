"""``report.html``: a self-contained page for one compile, with its PNG plots beside it.

:func:`write_html_report` draws three plots with matplotlib (the Agg renderer through ``matplotlib.figure.Figure``,
so no display and no global pyplot state) and writes them as ``size_vs_quality.png``, ``layer_bits.png`` and
``layer_error.png``; the page embeds the same PNGs as ``data:`` URIs, so it renders on its own when copied
elsewhere. It holds the totals table (against the float model), every preset tried on this model (this compile,
float, and other compiles found in sibling folders), the per-pass accounting table when the compile ran with
``--account`` (``pass_accounting``, :mod:`qir.debug.account`) and the per-layer table.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "render_html", "write_html_report"]

PLOTS: tuple[str, ...] = ("size_vs_quality.png", "layer_bits.png", "layer_error.png")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _points(report: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(label, MB, quality, is-this-compile) for float, this compile and the other compiles."""
    q, tot = report.get("quality"), report.get("totals")
    if not q or not tot:
        return []
    pts = [("float", tot["float_bytes"] / 1e6, q["float"], False)]
    label = report.get("preset") or "this compile"
    pts.append((f"{label} (this)", tot["qir_bytes"] / 1e6, q["compiled"], True))
    for o in report.get("others", []):
        pts.append((str(o["preset"]), o["qir_bytes"] / 1e6, o["compiled"], False))
    return pts


def plot_size_vs_quality(report: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    pts = _points(report)
    q = report.get("quality")
    if pts and q:
        for label, mb, val, mine in pts:
            ax.scatter([mb], [val], s=70 if mine else 40, color="tab:red" if mine else "tab:blue", zorder=3)
            ax.annotate(label, (mb, val), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel("weights, MB (qir stored bytes)")
        if q["metric"] == "ppl":
            ax.set_ylabel(f"perplexity ({q['windows']} x {q['window']} tokens, lower is better)")
        else:
            ax.set_ylabel("embedding cosine vs float (higher is better)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{report.get('source') or report['module']}: size vs quality")
    else:
        ax.text(0.5, 0.5, f"quality {report.get('quality_note', 'not measured')}", ha="center", va="center",
                wrap=True)
        ax.set_axis_off()
    return _png(fig)


def _layer_axis(ax: Any, rows: list[dict[str, Any]]) -> None:
    ax.set_xlabel(f"weight (in model order, {len(rows)} in all)")
    ax.set_xlim(-1, max(len(rows), 1))
    ax.grid(axis="y", alpha=0.3)


def plot_layer_bits(report: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    rows = report.get("layers") or []
    fig = Figure(figsize=(9, 3))
    ax = fig.add_subplot()
    bits = [r["bits"] if r["bits"] is not None else 0 for r in rows]
    colors = {4: "tab:orange", 8: "tab:blue", 2: "tab:red", 16: "tab:green", 32: "tab:gray"}
    ax.bar(range(len(rows)), bits, width=1.0, color=[colors.get(b, "tab:purple") for b in bits])
    ax.set_ylabel("bits per element")
    ax.set_title("bits per weight tensor")
    _layer_axis(ax, rows)
    return _png(fig)


def plot_layer_error(report: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    rows = report.get("layers") or []
    fig = Figure(figsize=(9, 3))
    ax = fig.add_subplot()
    errs = [100 * r["rel_error"] if r["rel_error"] is not None else 0.0 for r in rows]
    ax.bar(range(len(rows)), errs, width=1.0, color="tab:red", label="weight ||W~ - W|| / ||W||")
    if any(r.get("output_error") is not None for r in rows):
        outs = [100 * r["output_error"] if r.get("output_error") is not None else float("nan") for r in rows]
        ax.plot(range(len(rows)), outs, ".", color="black", markersize=3, label="output ||x(W~ - W)'|| / ||xW'||")
        ax.legend(fontsize=8)
    ax.set_ylabel("relative error, %")
    ax.set_title("error per weight tensor")
    _layer_axis(ax, rows)
    return _png(fig)


def _row(cells: list[Any], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def _fmt_bytes(n: float) -> str:
    return f"{n:,.0f} ({n / 1e6:.1f} MB)"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}%"


def _accounting(acc: dict[str, Any] | None) -> list[str]:
    """The per-pass accounting table (``--account``): the metric on the input, then after each pass."""
    if not acc:
        return []
    better = "lower" if acc.get("lower_is_better") else "higher"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.6g}"

    parts = ["<h2>Per-pass accounting</h2>",
             f"<p>{html.escape(str(acc.get('metric')))} ({better} is better) after each pass that changes numerics: "
             f"{html.escape(str(acc.get('sample')))}.</p>", '<table id="pass-accounting">',
             _row(["step", "pass", str(acc.get("metric")), "change", "vs input"], "th"),
             _row(["", "(input)", num(acc.get("input")), "", ""])]
    for r in acc.get("steps", []):
        if r.get("measured"):
            parts.append(_row([r["index"] + 1, r["pass"], num(r.get("metric")), _pct(r.get("delta_pct")),
                               _pct(r.get("vs_input_pct"))]))
        else:
            why = "no change" if not r.get("changed") else "numerics unchanged"
            parts.append(_row([r["index"] + 1, r["pass"], "-", f"({why})", ""]))
    parts.append("</table>")
    return parts


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The page (see the module docstring); ``plots`` maps each name of :data:`PLOTS` to its PNG bytes."""
    title = f"qir compile report: {report.get('source') or report['module']} for {report['target']}"
    tot = report.get("totals") or {}
    q = report.get("quality")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,"
             "th:first-child{text-align:left}img{display:block;margin:1em 0;max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>preset <code>{html.escape(str(report.get('preset') or '-'))}</code>, pipeline "
             f"<code>{html.escape(report.get('pipeline') or '(none)')}</code>, artifact files "
             f"{_fmt_bytes(report['bytes'])}</p>", "<h2>Totals against the float model</h2>",
             '<table id="totals">', _row(["", "float", "compiled"], "th")]
    if tot:
        parts.append(_row(["parameters", f"{tot['params']:,}", f"{tot['params']:,}"]))
        parts.append(_row(["weight bytes", _fmt_bytes(tot["float_bytes"]), _fmt_bytes(tot["qir_bytes"])]))
        parts.append(_row(["bits per parameter", "32.00", f"{tot['bits_per_param']:.2f}"]))
    if q:
        name = "perplexity" if q["metric"] == "ppl" else "embedding cosine (mean)"
        parts.append(_row([name, f"{q['float']:.4f}", f"{q['compiled']:.4f}"]))
    parts.append("</table>")
    if q and q["metric"] == "ppl":
        parts.append(f"<p>Perplexity on <code>{html.escape(q['text'])}</code>: {q['windows']} windows of "
                     f"{q['window']} tokens ({q['tokens']} predictions), float = the PyTorch FP32 model, compiled = "
                     f"this artifact on its runtime; change {100 * q['change']:+.2f}%.</p>")
    elif not q:
        parts.append(f"<p>Quality {html.escape(report.get('quality_note', 'not measured'))}.</p>")
    pts = _points(report)
    if pts:
        parts += ["<h2>Presets tried on this model</h2>", '<table id="presets">',
                  _row(["preset", "weights MB", "quality"], "th")]
        parts += [_row([label, f"{mb:.1f}", f"{val:.4f}"]) for label, mb, val, _ in pts]
        parts.append("</table>")
    parts += _accounting(report.get("pass_accounting"))
    parts.append("<h2>Plots</h2>")
    for name in PLOTS:
        data = base64.b64encode(plots[name]).decode("ascii")
        parts.append(f'<img id="{name[:-4]}" alt="{name}" src="data:image/png;base64,{data}">')
    rows = report.get("layers") or []
    parts += [f"<h2>Per layer ({len(rows)} weights)</h2>", '<table id="layers">',
              _row(["weight", "dtype", "bits", "granularity", "params", "bytes", "relative weight error",
                    "relative output error"], "th")]
    for r in rows:
        err = "n/a" if r["rel_error"] is None else f"{100 * r['rel_error']:.3f}%"
        out_err = "n/a" if r.get("output_error") is None else f"{100 * r['output_error']:.3f}%"
        parts.append(_row([r["name"], r["dtype"], r["bits"] if r["bits"] is not None else "-", r["granularity"],
                           f"{r['params']:,}", f"{r['bytes']:,}", err, out_err]))
    parts.append("</table>")
    if report.get("fallbacks") or report.get("warnings"):
        parts.append("<h2>Fallbacks and warnings</h2><ul>")
        parts += [f"<li>fallback: {html.escape(str(f))}</li>" for f in report.get("fallbacks", [])]
        parts += [f"<li>[{html.escape(w['rule'])}] {html.escape(w['where'])}: {html.escape(w['message'])}</li>"
                  for w in report.get("warnings", [])]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html_report(report: dict[str, Any], folder: Path) -> Path:
    """Draw the plots into ``folder`` and write ``folder/report.html``; returns its path."""
    plots = {"size_vs_quality.png": plot_size_vs_quality(report), "layer_bits.png": plot_layer_bits(report),
             "layer_error.png": plot_layer_error(report)}
    for name, data in plots.items():
        (folder / name).write_bytes(data)
    path = folder / "report.html"
    path.write_text(render_html(report, plots), encoding="utf-8")
    return path
