"""Tables for FINDINGS.md from the device results (research/out/round1, research/out/round2).

Equal-bytes reference: TEAL uniform's wiki log-perplexity as a function of the measured wiki budget, from the
TEAL points (30/40/50/60/70%), evaluated at each row's measured budget two ways: piecewise-linear in log ppl
(a chord: over-estimates a convex curve, i.e. flatters the method) and a quadratic through the three nearest
TEAL points (closer to the curve). ``vs TEAL`` uses the quadratic.
"""

import json
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
rows = []
for rnd in ("round1", "round2"):
    p = os.path.join(HERE, "out", rnd, "results.jsonl")
    for line in open(p):
        r = json.loads(line)
        r["round"] = rnd
        rows.append(r)
dense = next(r for r in rows if r["name"] == "dense")["wiki"]["ppl"]
teal = {}
for r in rows:
    if r.get("method") == "teal-uniform" and r["round"] == "round2" or (r.get("method") == "teal-uniform" and
                                                                         r["budget_target"] in (0.4, 0.6)):
        teal[r["wiki"]["budget"]] = r["wiki"]["ppl"]
tb = np.array(sorted(teal))
tl = np.array([math.log(teal[b]) for b in tb])


def teal_at(b):
    lin = math.exp(float(np.interp(b, tb, tl)))
    i = int(np.clip(np.searchsorted(tb, b) - 1, 0, len(tb) - 3))
    if i + 2 < len(tb) and abs(tb[i + 2] - b) > abs(tb[max(i - 1, 0)] - b) and i > 0:
        i -= 1
    c = np.polyfit(tb[i:i + 3], tl[i:i + 3], 2)
    return lin, math.exp(float(np.polyval(c, b)))


def fmt(r, ref=True):
    w = r["wiki"]
    b = w.get("budget", 0.0)
    lin, quad = teal_at(b) if b else (None, None)
    vs = f"{100 * (w['ppl'] / quad - 1):+.1f}%" if quad else ""
    exc = f"{100 * (1 - (w['ppl'] - dense) / (quad - dense)):.0f}%" if quad else ""
    c4 = r.get("c4ho", {})
    return (f"| {r['name']} | {r.get('budget_target', '')} | {b:.4f} | {1 - b:.4f} | {w['ppl']:.3f} | "
            f"{w.get('kl', 0):.4f} | {w.get('top1', 0):.4f} | {quad:.2f} | {vs} | {exc} | {c4.get('ppl', 0):.2f} |"
            if quad else f"| {r['name']} | | | | {w['ppl']:.3f} | | | | | | {c4.get('ppl', 0):.2f} |")


HEAD = ("| run | target | budget (wiki, net) | bytes read | wiki ppl | KL | top-1 | TEAL@same bytes | vs TEAL | "
        "excess removed | c4 held-out ppl |\n|---|---|---|---|---|---|---|---|---|---|---|")
print("dense", dense, "TEAL points", {round(float(b), 4): round(teal[b], 3) for b in tb})
print(HEAD)
seen = set()
for r in rows:
    if r["name"] in ("dense", "dense_2nd_half") or "prefill" in r["name"]:
        continue
    key = (r["name"], r["wiki"].get("ppl"))
    if key in seen:
        continue
    seen.add(key)
    print(fmt(r))
print()
print("TEAL chord vs quadratic at selected budgets:")
for b in (0.4815, 0.4971, 0.5036, 0.6246):
    print(b, [round(x, 2) for x in teal_at(b)])
# budget within +5% / +10% of dense, per method with >= 2 points bracketing
for meth in ("teal-uniform", "teal-greedy", "sens-kl-knapsack"):
    pts = sorted({(r["wiki"]["budget"], r["wiki"]["ppl"]) for r in rows if r.get("method") == meth
                  or (meth == "teal-greedy" and r.get("method") == "teal-greedy" or r["name"].startswith(meth + "_"))
                  and "prefill" not in r["name"] and "+" not in r["name"]})
    pts = [p for p in pts if p[0] > 0]
    for lim in (1.05, 1.10):
        tgt = math.log(dense * lim)
        bs = [p[0] for p in pts]
        ls = [math.log(p[1]) for p in pts]
        ans = None
        for (b0, l0), (b1, l1) in zip(zip(bs, ls), zip(bs[1:], ls[1:])):
            if l0 <= tgt <= l1:
                ans = b0 + (tgt - l0) / (l1 - l0) * (b1 - b0)
        print(f"{meth}: largest budget within +{round(100 * (lim - 1))}% of dense: "
              f"{ans if ans is None else round(ans, 4)} (points {[(round(b, 3), round(p, 2)) for b, p in pts]})")
