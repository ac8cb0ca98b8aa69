"""One self-contained HTML page: inline CSS, figures as PNG data URIs, a few lines of JS for sorting.

Nothing is fetched from the network, so the page opens from a file or an e-mail attachment; without
JavaScript everything but table sorting still works.
"""

from __future__ import annotations

import base64
import datetime as dt
import struct
from collections import defaultdict
from html import escape
from pathlib import Path
from statistics import median

from .figures import ALPHA_BAND

CSS = """
:root { --fg:#1b1b1b; --muted:#5f6368; --line:#dadce0; --bg:#fff; --head:#f1f3f4; --accent:#1a73e8; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg);
       background:var(--bg); }
header { background:#202124; color:#fff; padding:14px 24px; }
header h1 { margin:0; font-size:21px; font-weight:600; }
header p { margin:2px 0 0; color:#bdc1c6; font-size:13px; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line);
      padding:6px 24px; font-size:14px; }
nav a { margin-right:16px; color:var(--accent); text-decoration:none; }
main { max-width:1240px; margin:0 auto; padding:8px 24px 48px; }
section { margin-top:22px; }
h2 { font-size:19px; border-bottom:1px solid var(--line); padding-bottom:4px; }
h3 { font-size:16px; margin:18px 0 6px; }
.cards { display:flex; flex-wrap:wrap; gap:10px; }
.card { border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:140px; }
.card b { display:block; font-size:20px; }
.card span { color:var(--muted); font-size:12px; }
table { border-collapse:collapse; font-size:13px; }
th, td { border-bottom:1px solid var(--line); padding:3px 8px; text-align:left; vertical-align:top; }
td.n { text-align:right; font-variant-numeric:tabular-nums; }
table.kv th { background:none; font-weight:600; color:var(--muted); }
figure { margin:10px 0 22px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); }
figcaption { color:var(--muted); font-size:13px; }
.scroll { max-height:75vh; overflow:auto; border:1px solid var(--line); }
table.sortable thead th { position:sticky; top:0; background:var(--head); cursor:pointer; white-space:nowrap; }
table.sortable thead th[data-dir=asc]::after { content:" \\25B2"; }
table.sortable thead th[data-dir=desc]::after { content:" \\25BC"; }
table.sortable tbody tr:nth-child(even) { background:#fafafa; }
tr.warn td:first-child { border-left:3px solid #e37400; }
.warnings li { margin:3px 0; }
.row { display:flex; flex-wrap:wrap; gap:12px 40px; align-items:flex-start; }
.row h3 { margin-top:0; }
td.w { white-space:nowrap; font-size:12px; color:#8a4b00; }
td code { white-space:nowrap; }
.note { color:var(--muted); font-size:13px; }
.bad { color:#b3261e; }
code { font-size:12.5px; }
"""

SORT_JS = """
document.querySelectorAll("table.sortable thead th").forEach(function (th, i) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], asc = th.dataset.dir !== "asc";
    th.parentNode.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-dir"); });
    th.dataset.dir = asc ? "asc" : "desc";
    function key(row) {
      var c = row.cells[i];
      return c.dataset.v === undefined ? c.textContent : (c.dataset.v === "" ? NaN : Number(c.dataset.v));
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x === "number") {
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
        return asc ? x - y : y - x;
      }
      return (asc ? 1 : -1) * x.localeCompare(y, undefined, {numeric: true});
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

EVAL_SETTINGS = ("text", "ctx", "tokens", "mode", "prefill")  # shown per eval result
CALIBRATION_SETTINGS = ("text", "n_tokens", "tokens", "ctx", "max_abs_deviation")  # shown per calibrated plan
SECTIONS = (("spectra", "Spectra (ESD)"), ("alpha", "Heavy-tail exponent"), ("allocation", "Allocation"),
            ("calibration", "Calibration"), ("accuracy", "Accuracy"))


# ---- small builders --------------------------------------------------------------------------------

def fmt(v, spec: str = ".3g") -> str:
    """A number for a table cell; '–' for missing."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return escape(str(v))
    return format(v, spec) if spec else str(v)


def num_cell(v, spec: str = ".3g") -> str:
    return f'<td class="n" data-v="{"" if v is None else v}">{fmt(v, spec)}</td>'


def kv_table(pairs) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def plain_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (so the page reserves the space before decoding)."""
    return struct.unpack(">II", png[16:24])


def figure_html(fig: dict) -> str:
    w, h = png_size(fig["png"])
    data = base64.b64encode(fig["png"]).decode("ascii")
    return (f'<figure id="fig-{escape(fig["name"])}"><img src="data:image/png;base64,{data}" width="{w}" '
            f'height="{h}" alt="{escape(fig["title"])}" loading="eager">'
            f'<figcaption><b>{escape(fig["title"])}.</b> {escape(fig["caption"])} '
            f'<span class="note">(figures/{escape(fig["name"])}.png, .svg)</span></figcaption></figure>')


def card(value: str, label: str) -> str:
    return f'<div class="card"><b>{value}</b><span>{escape(label)}</span></div>'


# ---- sections --------------------------------------------------------------------------------------

def model_section(rep) -> str:
    a = rep.analysis
    m, s = a["model"], a.get("settings") or {}
    pairs = [("model path", f"<code>{escape(str(m.get('path')))}</code>"),
             ("fingerprint", f"<code>{escape(str(m.get('fingerprint')))}</code>"),
             ("architecture", fmt(m.get("architecture"))), ("model type", fmt(m.get("model_type"))),
             ("layers", fmt(m.get("num_layers"))),
             ("analysis", f"{fmt(a.get('created'))}, acttail {fmt(a.get('tool_version'))}")]
    html = (f'<div class="row"><div><h3>Model</h3>{kv_table(pairs)}</div>'
            f'<div><h3>ESD settings</h3>{kv_table([(k, fmt(v, "")) for k, v in s.items()])}</div></div>')
    return html


def _method_text(method) -> str:
    if isinstance(method, dict):
        return ", ".join(f"{k}={v}" for k, v in method.items() if not isinstance(v, (dict, list)))
    return str(method)


def _settings_text(settings, keys=None) -> str:
    """``k=v, ...`` for the scalar settings (only ``keys`` when given and present)."""
    if not isinstance(settings, dict):
        return ""
    if keys and any(k in settings for k in keys):
        settings = {k: settings[k] for k in keys if k in settings}

    def plain(v):  # the caller escapes
        return format(v, ".3g") if isinstance(v, float) else "–" if v is None else str(v)

    return ", ".join(f"{k}={plain(v)}" for k, v in settings.items() if not isinstance(v, (dict, list)))


def inputs_tables(rep) -> str:
    """The plans and eval results given, one row each."""
    html = ""
    if rep.plans:
        rows = []
        for p in rep.plans:
            calibration = "no"
            if p.calibrated:
                calibration = f"yes ({_settings_text(p.raw.get('calibration'), CALIBRATION_SETTINGS)})"
            rows.append([f'<td title="{escape(str(p.path))}"><code>{escape(p.path.name)}</code></td>',
                         num_cell(p.budget, ".1%"), num_cell(p.weighted_sparsity, ".2%"),
                         f"<td>{escape(_method_text(p.method))}</td>", f"<td>{escape(calibration)}</td>"])
        html += "<h3>Plans</h3>" + plain_table(
            ["file", "budget", "weighted sparsity", "method", "calibrated"], rows)
    if rep.evals:
        rows = []
        for e in rep.evals:
            plan, achieved = e.get("plan"), e.get("achieved") or {}
            rows.append([f'<td title="{escape(e["_path"])}"><code>{escape(Path(e["_path"]).name)}</code></td>',
                         f"<td>{escape(e['_label'])}</td>",
                         num_cell(None if plan is None else plan["budget"], ".0%"),
                         num_cell(achieved.get("weighted_achieved"), ".1%"),
                         num_cell(e["perplexity"], ".3f"),
                         f"<td>{escape(_settings_text(e.get('settings'), EVAL_SETTINGS))}</td>"])
        html += "<h3>Evaluation results</h3>" + plain_table(
            ["file", "run", "budget", "achieved sparsity", "perplexity", "settings"], rows)
    return html


def headline_evals(rep, limit: int = 7) -> list[tuple[str, dict]]:
    """Eval results for the summary: dense first, then the runs at the given plans' budgets."""
    budgets = {round(p.budget, 6) for p in rep.plans}

    def order(e):
        plan = e.get("plan")
        return (plan is not None, plan is not None and round(plan["budget"], 6) not in budgets,
                plan["budget"] if plan else 0, e["_label"])

    picked = sorted(rep.evals, key=order)[:limit]
    return [("dense" if e.get("plan") is None else f"{e['_label']} {e['plan']['budget']:.0%}", e) for e in picked]


def summary_section(rep) -> str:
    rows = rep.analysis["projections"]
    alphas = [r["alpha"] for r in rows if r.get("alpha") is not None]
    lo, hi = ALPHA_BAND
    cards = [card(str(len(rows)), "projections"), card(f"{len(alphas)}", "power-law fits")]
    if alphas:
        n = len(alphas)
        cards += [card(f"{median(alphas):.2f}", "median alpha"),
                  card(f"{min(alphas):.2f} – {max(alphas):.2f}", "alpha range"),
                  card(f"{sum(lo <= a <= hi for a in alphas) / n:.0%}", f"alpha in [{lo:g}, {hi:g}]"),
                  card(f"{sum(a < lo for a in alphas)} / {sum(a > hi for a in alphas)}",
                       f"alpha < {lo:g} / > {hi:g}")]
    cards.append(card(str(sum(1 for r in rows if r.get("warnings"))), "projections with warnings"))
    for p in rep.plans:
        cards.append(card(f"{p.budget:.0%}", f"budget of {p.label}"))
    cards += [card(f"{e['perplexity']:.2f}", f"perplexity, {name}") for name, e in headline_evals(rep)]
    html = f'<div class="cards">{"".join(cards)}</div>' + inputs_tables(rep)
    extra = rep.analysis.get("summary")
    if isinstance(extra, dict):
        flat = [(k, fmt(v)) for k, v in extra.items() if not isinstance(v, (dict, list))]
        nested = [(k, v) for k, v in extra.items() if isinstance(v, dict) and v
                  and all(isinstance(x, dict) for x in v.values())]
        parts = [f"<div><h3>Analysis summary</h3>{kv_table(flat)}</div>"] if flat else []
        for name, table in nested:  # e.g. per_kind: {"q": {"n": 30, "mean": 3.4, ...}, ...}
            cols = list(dict.fromkeys(c for row in table.values() for c in row))
            rows = [[f"<td>{escape(str(k))}</td>"] + [num_cell(row.get(c)) for c in cols] for k, row in table.items()]
            parts.append(f"<div><h3>Analysis summary: {escape(name)}</h3>{plain_table(['', *cols], rows)}</div>")
        html += f'<div class="row">{"".join(parts)}</div>'
    return html


def figures_section(rep) -> str:
    out = []
    for sid, title in SECTIONS:
        figs = [f for f in rep.figures if f["section"] == sid]
        if figs:
            out.append(f'<h3 id="{sid}">{escape(title)}</h3>' + "".join(figure_html(f) for f in figs))
    if not rep.plans:
        out.append('<p class="note">No plan given (<code>--plan</code>): allocation figures omitted.</p>')
    if not rep.evals:
        out.append('<p class="note">No evaluation result given (<code>--eval</code>): accuracy figure '
                   'omitted.</p>')
    return "".join(out)


def table_section(rep) -> str:
    plan_maps = [{r["key"]: r for r in p.rows} for p in rep.plans]
    head = ["key", "layer", "kind", "shape", "params", "evals", "alpha", "xmin", "tail", "KS D",
            "λ max", "stable rank", "log norm", "α̂ (weighted)"]
    for p in rep.plans:
        tag = p.path.stem
        head += [f"sparsity {tag}"] + ([f"achieved {tag}", f"threshold {tag}"] if p.calibrated else [])
    head.append("warnings")
    body = []
    for i, r in enumerate(rep.analysis["projections"]):
        cells = [f'<td data-v="{i}">{escape(r["key"])}</td>', num_cell(r["layer"], "d"),
                 f"<td>{escape(r['kind'])}</td>",
                 f'<td class="n" data-v="{r["params"]}">{r["out_features"]}×{r["in_features"]}</td>',
                 num_cell(r["params"], ","), num_cell(r.get("n_evals"), ","), num_cell(r.get("alpha"), ".3f"),
                 num_cell(r.get("xmin")), num_cell(r.get("n_tail"), ","), num_cell(r.get("ks_distance"), ".4f"),
                 num_cell(r.get("lambda_max"), ".4g"), num_cell(r.get("stable_rank")), num_cell(r.get("log_norm")),
                 num_cell(r.get("alpha_weighted"))]
        for p, rows in zip(rep.plans, plan_maps):
            pr = rows.get(r["key"]) or {}
            cells.append(num_cell(pr.get("sparsity"), ".1%"))
            if p.calibrated:
                achieved = (pr.get("calibration") or {}).get("achieved_sparsity")
                cells += [num_cell(achieved, ".1%"), num_cell(pr.get("threshold"), ".4g")]
        warns = r.get("warnings") or []
        cells.append(f'<td class="w">{escape("; ".join(warns))}</td>')
        body.append(f'<tr{" class=warn" if warns else ""}>' + "".join(cells) + "</tr>")
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    return ('<p class="note">Click a column header to sort (needs JavaScript). Rows with a warning have an '
            'orange edge.</p><div class="scroll"><table class="sortable" id="projections"><thead><tr>'
            f'{th}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def warnings_section(rep) -> str:
    items = [f'<li class="bad">{escape(w)}</li>' for w in rep.warnings]
    grouped = defaultdict(list)
    for r in rep.analysis["projections"]:
        for w in r.get("warnings") or []:
            grouped[w].append(r["key"])
    for w, keys in sorted(grouped.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(keys[:12]) + (f", … ({len(keys) - 12} more)" if len(keys) > 12 else "")
        items.append(f"<li><b>{escape(w)}</b> — {len(keys)} projection{'s' * (len(keys) != 1)}: "
                     f"<code>{escape(shown)}</code></li>")
    if not items:
        return "<p>No warnings.</p>"
    return f'<ul class="warnings">{"".join(items)}</ul>'


# ---- page ------------------------------------------------------------------------------------------

def render_report(rep, seconds: float) -> str:
    """The whole page as one string."""
    m = rep.analysis["model"]
    name = str(m.get("path") or "model").rstrip("/").split("/")[-1]
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_warn = len(rep.warnings) + sum(1 for r in rep.analysis["projections"] if r.get("warnings"))
    sections = [("model", "Model and settings", model_section(rep)), ("summary", "Summary", summary_section(rep)),
                ("figures", "Figures", figures_section(rep)),
                ("table", "Projections", table_section(rep)),
                ("warnings", f"Warnings ({n_warn})", warnings_section(rep))]
    present = [(sid, title) for sid, title in SECTIONS if any(f["section"] == sid for f in rep.figures)]
    links = [(sid, title) for sid, title, _ in sections]
    links = links[:3] + present + links[3:]  # figure sections right after "Figures"
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title in links)
    body = "".join(f'<section id="{sid}"><h2>{escape(title)}</h2>{html}</section>' for sid, title, html in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ActTail report: {escape(name)}</title>
<style>{CSS}</style></head>
<body><header><h1>ActTail report: {escape(name)}</h1>
<p>{escape(str(m.get("architecture")))}, {m.get("num_layers")} layers, {len(rep.analysis["projections"])} projections
 · {len(rep.plans)} plan(s) · {len(rep.evals)} eval result(s) · generated {now} in {seconds:.1f} s</p></header>
<nav>{nav}</nav>
<main>{body}</main>
<script>{SORT_JS}</script>
</body></html>
"""
