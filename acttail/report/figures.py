"""Report figures (matplotlib, Agg): spectra, alpha and sparsity maps, calibration, perplexity.

Every function takes plain data (analysis rows, plan rows, eigenvalues) and returns a
``matplotlib.figure.Figure``; ``save`` writes it as PNG and SVG. No pyplot: figures are not kept in
a global registry, so a report over 560 projections does not pile up memory.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from ..outputs import write_file, writing  # noqa: E402
from ..layout import KINDS  # noqa: E402

KIND_COLORS = dict(zip(KINDS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")))
ALPHA_BAND = (2.0, 6.0)  # HT-SR: well-trained layers have 2 <= alpha <= 6
ANNOTATE_MAX_LAYERS = 40  # write values into heatmap cells only while they stay legible
DPI = 110


def kinds_of(rows: list[dict]) -> list[str]:
    """Projection kinds present in ``rows``, in the canonical q,k,v,o,gate,up,down order."""
    present = {r["kind"] for r in rows}
    return [k for k in KINDS if k in present] + sorted(present - set(KINDS))


def kind_color(kind: str) -> str:
    return KIND_COLORS.get(kind, "#7f7f7f")


def grid(rows: list[dict], value) -> tuple[np.ndarray, list[str], list[int]]:
    """A kinds x layers array of ``value(row)`` (NaN where missing or None)."""
    kinds = kinds_of(rows)
    layers = sorted({r["layer"] for r in rows})
    ki = {k: i for i, k in enumerate(kinds)}
    li = {l: j for j, l in enumerate(layers)}
    out = np.full((len(kinds), len(layers)), np.nan)
    for r in rows:
        v = value(r)
        if v is not None:
            out[ki[r["kind"]], li[r["layer"]]] = v
    return out, kinds, layers


def save(fig: Figure, folder: Path, name: str) -> bytes:
    """Write ``fig`` as ``name.png`` and ``name.svg`` into ``folder``; return the PNG bytes."""
    buf, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    png = buf.getvalue()
    fig.set_layout_engine("none")  # keep the layout just computed for the PNG
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text: smaller, faster, searchable
        fig.savefig(svg, format="svg")
    with writing(f"report figure {name}"):
        write_file(folder / f"{name}.png", png)
        write_file(folder / f"{name}.svg", svg.getvalue())
    return png


# ---- spectra --------------------------------------------------------------------------------------

def _positive(evals) -> np.ndarray:
    evals = np.sort(np.asarray(evals, dtype=np.float64))
    return evals[evals > 0]


def _ccdf(ax, evals: np.ndarray, row: dict, label_fit: bool, lw: float = 1.5, ms: float = 2.0) -> None:
    """Empirical CCDF P(X >= x) on log-log axes and the fitted power law drawn from xmin."""
    n = len(evals)
    ax.loglog(evals, (n - np.arange(n)) / n, ".", ms=ms, color="#555555", label="eigenvalues")
    alpha, xmin = row.get("alpha"), row.get("xmin")
    if alpha is not None and xmin is not None and xmin > 0:
        tail = evals[evals >= xmin]
        if len(tail):
            x = np.geomspace(xmin, tail[-1], 50)
            frac = len(tail) / n
            label = f"power law α={alpha:.2f}" + (f", KS D={row['ks_distance']:.3f}"
                                                  if label_fit and row.get("ks_distance") is not None else "")
            ax.loglog(x, frac * (x / xmin) ** (1.0 - alpha), "-", lw=lw, color="#d62728", label=label)
        ax.axvline(xmin, ls="--", lw=1, color="#1f77b4", label=f"xmin={xmin:.3g}" if label_fit else None)


def esd_figure(evals, row: dict) -> Figure:
    """ESD of one projection: log-binned histogram and CCDF, power-law fit from xmin, alpha and KS."""
    evals = _positive(evals)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    hist_ax, ccdf_ax = fig.subplots(1, 2)
    bins = np.geomspace(evals[0], evals[-1] * (1 + 1e-9), min(60, max(10, len(evals) // 8)))
    hist_ax.hist(evals, bins=bins, density=True, color="#9ecae1", edgecolor="#3182bd", lw=0.5,
                 label="eigenvalues")
    hist_ax.set_xscale("log")
    hist_ax.set_yscale("log")
    alpha, xmin = row.get("alpha"), row.get("xmin")
    if alpha is not None and xmin is not None and xmin > 0:
        frac = float(np.mean(evals >= xmin))
        x = np.geomspace(xmin, evals[-1], 50)
        hist_ax.plot(x, frac * (alpha - 1) / xmin * (x / xmin) ** (-alpha), "-", color="#d62728",
                     label=f"power law α={alpha:.2f}")
        hist_ax.axvline(xmin, ls="--", lw=1, color="#1f77b4", label=f"xmin={xmin:.3g}")
    hist_ax.set(xlabel="eigenvalue λ", ylabel="density", title="histogram (log bins)")
    hist_ax.legend(fontsize=8)
    _ccdf(ccdf_ax, evals, row, label_fit=True)
    ccdf_ax.set(xlabel="eigenvalue λ", ylabel="P(Λ ≥ λ)", title="complementary CDF")
    for ax in (hist_ax, ccdf_ax):
        _sparse_log_ticks(ax.xaxis)
    ccdf_ax.legend(fontsize=8)
    shape = f"{row['out_features']}×{row['in_features']}"
    status = "" if alpha is not None else " — fit failed"
    fig.suptitle(f"ESD of {row['key']} ({shape}, {len(evals)} eigenvalues){status}", fontsize=11)
    return fig


def _sparse_log_ticks(axis) -> None:
    """At most a few labelled ticks on a narrow log axis (matplotlib would label every minor tick)."""
    lo, hi = sorted(axis.get_view_interval())
    subs = (1.0,) if hi / lo > 100 else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=5))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def esd_grid_figure(spectra: list[tuple[dict, np.ndarray]], title: str, ncols: int = 4) -> Figure:
    """Small multiples: one CCDF thumbnail per projection, each with its alpha and KS distance."""
    n = len(spectra)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.2 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (row, evals) in zip(axes, spectra):
        _ccdf(ax, _positive(evals), row, label_fit=False, lw=1.2, ms=1.2)
        a, d = row.get("alpha"), row.get("ks_distance")
        text = f"α={a:.2f}" if a is not None else "fit failed"
        text += f"  D={d:.3f}" if d is not None else ""
        ax.set_title(f"{row['key']}\n{text}", fontsize=8)
        ax.tick_params(labelsize=6)
        _sparse_log_ticks(ax.xaxis)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig


# ---- alpha and allocation maps ----------------------------------------------------------------------

class BandNorm(Normalize):
    """Piecewise-linear norm that puts the HT-SR band [2, 6] in the pale middle of a diverging map."""

    def __init__(self, vmin: float, vmax: float, band=ALPHA_BAND):
        super().__init__(vmin=vmin, vmax=vmax, clip=True)
        self._x = [vmin, band[0], band[1], vmax]
        self._y = [0.0, 0.35, 0.65, 1.0]

    def __call__(self, value, clip=None):
        value = np.ma.masked_invalid(np.asarray(value, dtype=np.float64))
        out = np.interp(value.filled(np.nan), self._x, self._y)
        return np.ma.masked_array(out, mask=np.ma.getmaskarray(value))

    def inverse(self, value):
        return np.interp(value, self._y, self._x)


def _heatmap(values: np.ndarray, kinds: list[str], layers: list[int], cmap, norm, fmt: str,
             cbar_label: str, title: str) -> tuple[Figure, object]:
    """Kinds as rows and layers as columns: wide rather than tall, so 80 layers fit a laptop screen."""
    width = min(14.0, max(7.0, 1.6 + 0.3 * len(layers)))
    fig = Figure(figsize=(width, 0.42 * len(kinds) + 1.6), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps[cmap].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm,
                   interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds)
    step = max(1, math.ceil(len(layers) / 40))
    ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]], fontsize=7)
    ax.set(xlabel="layer", title=title)
    if len(layers) <= ANNOTATE_MAX_LAYERS:
        for i in range(len(kinds)):
            for j in range(len(layers)):
                v = values[i, j]
                text = "–" if np.isnan(v) else format(v, fmt)
                shade = 0.5 if np.isnan(v) else norm(v)
                dark = float(np.ma.getdata(shade)) < 0.2 or float(np.ma.getdata(shade)) > 0.8
                ax.text(j, i, text, ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    cbar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04)
    cbar.set_label(cbar_label)
    return fig, cbar


def alpha_heatmap(rows: list[dict]) -> Figure:
    """Alpha per layer x kind on a diverging scale centred on the 2-6 band; warnings marked ×."""
    values, kinds, layers = grid(rows, lambda r: r.get("alpha"))
    finite = values[np.isfinite(values)]
    vmin = min(1.0, float(finite.min())) if finite.size else 1.0
    vmax = max(8.0, float(finite.max())) if finite.size else 8.0
    fig, cbar = _heatmap(values, kinds, layers, "RdBu", BandNorm(vmin, vmax), ".1f", "alpha",
                         "Heavy-tail exponent alpha (pale: HT-SR band 2–6; red: heavier tail; "
                         "blue: closer to random)")
    upper = [float(f"{v:.2g}") for v in np.geomspace(ALPHA_BAND[1], vmax, 4)[1:]]
    cbar.set_ticks(sorted({round(vmin, 1), *ALPHA_BAND, 4.0, *upper}))
    for a in ALPHA_BAND:
        cbar.ax.axhline(a, color="black", lw=0.8)
    ax = fig.axes[0]
    warned, _, _ = grid(rows, lambda r: 1.0 if r.get("warnings") else None)
    ii, jj = np.nonzero(warned == 1.0)
    if len(ii):
        offset = 0.0 if len(layers) > ANNOTATE_MAX_LAYERS else 0.32
        ax.scatter(jj + offset, ii - offset, marker="x", s=14, c="black", lw=1.0)
    ax.set_xlabel("layer    (× projection with a warning, grey: no fit)")
    return fig


def sparsity_heatmap(plan_rows: list[dict], title: str) -> Figure:
    """Planned activation sparsity per layer x kind."""
    values, kinds, layers = grid(plan_rows, lambda r: r.get("sparsity"))
    return _heatmap(values * 100, kinds, layers, "viridis", Normalize(0, 100), ".0f",
                    "sparsity (%)", title)[0]


def _weighted_mean(pairs) -> float:
    pairs = list(pairs)
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def kind_bars(plans: list[tuple[str, list[dict], float]]) -> Figure:
    """Per kind, each plan's parameter-weighted mean sparsity (min-max whiskers) beside uniform."""
    kinds = kinds_of([r for _, rows, _ in plans for r in rows])
    fig = Figure(figsize=(min(11.0, 3 + 0.6 * len(kinds) * len(plans)), 3.8), layout="constrained")
    ax = fig.subplots()
    n_bars = 2 * len(plans)
    width = 0.8 / n_bars
    x = np.arange(len(kinds))
    for p, (label, rows, budget) in enumerate(plans):
        by_kind = defaultdict(list)
        for r in rows:
            by_kind[r["kind"]].append(r)
        mean = np.array([_weighted_mean((r["sparsity"], r["params"]) for r in by_kind[k]) for k in kinds])
        lo = np.array([min(r["sparsity"] for r in by_kind[k]) for k in kinds])
        hi = np.array([max(r["sparsity"] for r in by_kind[k]) for k in kinds])
        base = x - 0.4 + width * (2 * p + 0.5)
        ax.bar(base, 100 * mean, width, color="#3182bd", alpha=1.0 - 0.45 * p / max(1, len(plans)),
               yerr=np.clip([100 * (mean - lo), 100 * (hi - mean)], 0, None), capsize=2, error_kw={"lw": 0.8},
               label=f"{label} (min–max)")
        ax.bar(base + width, np.full(len(kinds), 100 * budget), width, color="#bdbdbd",
               edgecolor="#636363", lw=0.5, label=f"uniform {budget:.0%}")
    ax.set_xticks(x, kinds)
    ax.set(ylabel="sparsity (%)", ylim=(0, 100), title="Sparsity per projection kind: plan vs uniform")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def alpha_sparsity_scatter(plans: list[tuple[str, list[dict], str]]) -> Figure:
    """Sparsity against each plan's metric (alpha), one panel per plan, coloured by kind.

    Shows the map from alpha to sparsity and where it was clipped; failed fits (null metric) are left out.
    """
    fig = Figure(figsize=(min(14.0, 4.6 * len(plans) + 1), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(plans), sharey=True, squeeze=False)).ravel()
    for ax, (label, rows, metric) in zip(axes, plans):
        for kind in kinds_of(rows):
            pts = [(r["metric"], r["sparsity"]) for r in rows if r["kind"] == kind and r.get("metric") is not None]
            if pts:
                a, s = np.array(pts).T
                ax.scatter(a, 100 * s, s=12, color=kind_color(kind), label=kind, alpha=0.8, lw=0)
        if metric == "alpha":
            ax.axvspan(*ALPHA_BAND, color="#f0f0f0", zorder=0)
        ax.set(xlabel=metric, title=label)
    axes[0].set_ylabel("sparsity (%)")
    axes[-1].legend(fontsize=7, markerscale=1.5, loc="best")
    fig.suptitle("Metric vs allocated sparsity, one point per projection (grey: HT-SR band 2 ≤ α ≤ 6)",
                 fontsize=10)
    return fig


# ---- calibration ------------------------------------------------------------------------------------

def calibration_figure(plan_rows: list[dict], title: str, measured: dict | None = None,
                       measured_text: str = "") -> Figure:
    """Target vs achieved sparsity per projection (left) and the calibrated threshold per layer (right).

    ``measured`` (key -> sparsity achieved in an eval run of this plan) adds hollow markers: how well the
    thresholds set on the calibration text hold on the evaluation text.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_t, ax_h = fig.subplots(1, 2)
    if measured:
        pts = [(r["sparsity"], measured[r["key"]]) for r in plan_rows if measured.get(r["key"]) is not None]
        if pts:
            t, a = np.array(pts).T
            ax_t.scatter(100 * t, 100 * a, s=16, facecolors="none", edgecolors="#333333", lw=0.6,
                         label=f"on {measured_text} (eval)", zorder=3)
    for kind in kinds_of(plan_rows):
        rows = [r for r in plan_rows if r["kind"] == kind]
        pts = [(r["sparsity"], r["calibration"]["achieved_sparsity"]) for r in rows
               if r.get("calibration") and r["calibration"].get("achieved_sparsity") is not None]
        if pts:
            t, a = np.array(pts).T
            ax_t.scatter(100 * t, 100 * a, s=12, color=kind_color(kind), label=kind, alpha=0.8, lw=0)
        th = sorted((r["layer"], r["threshold"]) for r in rows if r.get("threshold") is not None)
        if th:
            layer, value = np.array(th).T
            ax_h.plot(layer, value, ".-", ms=3, lw=1, color=kind_color(kind), label=kind)
    lim = [0, 100]
    ax_t.plot(lim, lim, "--", lw=0.8, color="black", label="achieved = target")
    ax_t.set(xlabel="target sparsity (%)", ylabel="achieved sparsity (%)", xlim=lim, ylim=lim,
             title="target vs achieved sparsity per projection")
    ax_t.legend(fontsize=7, markerscale=1.5)
    thresholds = [r["threshold"] for r in plan_rows if r.get("threshold") is not None]
    if thresholds and min(thresholds) > 0:
        ax_h.set_yscale("log")
    ax_h.set(xlabel="layer", ylabel="threshold |x|", title="threshold per layer")
    ax_h.legend(fontsize=7, ncols=2)
    fig.suptitle(title, fontsize=10)
    return fig


# ---- accuracy --------------------------------------------------------------------------------------

def perplexity_figure(series: dict[str, list[tuple[float, float]]], dense: list[float],
                      title: str) -> Figure:
    """Perplexity vs budget (log y), one line per allocation method; dense as a dashed line."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    styles = {"acttail": ("o-", "#d62728"), "uniform": ("s--", "#636363")}
    for name, pts in sorted(series.items()):
        pts = sorted(pts)
        x, y = np.array(pts).T
        fmt, color = styles.get(name, ("^-", None))
        ax.plot(100 * x, y, fmt, color=color, label=name, ms=5)
    for ppl in dense[:1]:
        ax.axhline(ppl, ls=":", color="black", lw=1)
        ax.plot([0], [ppl], "*", ms=9, color="black", label=f"dense {ppl:.2f}")
    ax.set_xlim(-3, 100)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if hi / lo < 20 else NullFormatter())
    ax.set(xlabel="sparsity budget (%)", ylabel="perplexity (log scale)", title=title)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def frontier_figure(series: dict[str, list[tuple[float, float, float]]], dense: float,
                    speed: list[tuple[float, float]] | None, title: str) -> Figure:
    """What each method keeps at each budget: perplexity increase over dense and KL to dense against the
    budget, and (with a measured speed table) the perplexity increase against the decode speed-up."""
    panels = 3 if speed else 2
    fig = Figure(figsize=(4.2 * panels, 3.8), layout="constrained")
    axes = fig.subplots(1, panels)
    for name, pts in sorted(series.items()):
        pts = sorted(pts)
        b = np.array([p[0] for p in pts])
        inc = np.array([100 * (p[1] / dense - 1) for p in pts])
        kl = np.array([np.nan if p[2] is None else p[2] for p in pts])
        axes[0].plot(100 * b, inc, "o-", ms=4, label=name)
        axes[1].plot(100 * b, kl, "o-", ms=4, label=name)
        if speed:
            axes[2].plot(np.interp(b, *np.array(sorted(speed)).T), inc, "o-", ms=4, label=name)
    axes[0].set(xlabel="budget: projection bytes not read (%)", ylabel="perplexity increase over dense (%)",
                yscale="log")
    axes[1].set(xlabel="budget: projection bytes not read (%)", ylabel="KL to dense (nats/token)", yscale="log")
    if speed:
        axes[2].set(xlabel="decode speed-up (measured, GPU)", ylabel="perplexity increase over dense (%)",
                    yscale="log")
    for ax in axes:
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return fig
