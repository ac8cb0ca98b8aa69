"""Round 1 of the quality study (SmolLM2-135M, GPU fp32, TF32 off). Writes results.jsonl + log.txt to --out.

Order (by expected value): dense + TEAL uniform 40/50/60 (sanity: 22.30 / 34.84), least-squares refit
(ridge sweep, local vs dense-model target, 40/60), TEAL greedy allocation, sensitivity knapsack, combos with
refit, SPON biases, low-rank at equal bytes, attribution / WINA scores. A time guard skips what no longer fits.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--smoke", action="store_true")
ap.add_argument("--deadline", type=float, default=540)
ap.add_argument("--only", default="")
args = ap.parse_args()
T0 = time.time()
os.makedirs(args.out, exist_ok=True)
LOG = open(os.path.join(args.out, "log.txt"), "a")
RES = open(os.path.join(args.out, "results.jsonl"), "a")


def log(*a):
    s = f"[{time.time() - T0:7.1f}s] " + " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    log("device", torch.cuda.get_device_name(0))
model = lab.Model.from_gguf(args.gguf, dev, n_layer=2 if args.smoke else None)
NL = model.cfg.n_layer
tok = torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tokens.pt"))
if args.smoke:
    wiki = tok["wiki"][:4 * 128].long().view(4, 128)
    c4cal = tok["c4cal"][:8 * 128].long().view(8, 128)
    c4ho = tok["c4"][65536:65536 + 2 * 128].long().view(2, 128)
else:
    wiki = tok["wiki"][:32768].long().view(64, 512)
    c4cal = tok["c4cal"][:65536].long().view(128, 512)
    c4ho = tok["c4"][65536:65536 + 24 * 512].long().view(24, 512)
c4in = c4cal[:16]
refs = {"wiki": lab.DenseRef(model, wiki), "c4ho": lab.DenseRef(model, c4ho), "c4in": lab.DenseRef(model, c4in)}
log("dense", {k: round(r.ppl, 5) for k, r in refs.items()})
RES.write(json.dumps({"name": "dense", "wiki": {"ppl": refs["wiki"].ppl}, "c4ho": {"ppl": refs["c4ho"].ppl},
                      "c4in": {"ppl": refs["c4in"].ppl}}) + "\n")
RES.flush()
ONLY = set(args.only.split(",")) if args.only else None


def left():
    return args.deadline - (time.time() - T0)


def want(tag, need=10):
    if ONLY is not None and tag not in ONLY:
        return False
    if left() < need:
        log(f"SKIP {tag}: {left():.0f}s left")
        return False
    return True


def record(name, method, budget, sp, extra=None, sets=("wiki", "c4ho", "c4in"), tcal=None):
    t = time.time()
    row = {"name": name, "method": method, "budget_target": budget}
    if sp is not None:
        row["calib_weighted_target"] = None
    for s in sets:
        r = lab.evaluate(model, refs[s], sp)
        ach = r.pop("achieved", None)
        row[s] = r
        if s == "wiki" and ach is not None:
            row["achieved_wiki"] = ach
    if extra:
        row.update(extra)
    if tcal is not None:
        row["t_calib_s"] = tcal
    RES.write(json.dumps(row) + "\n")
    RES.flush()
    w = row["wiki"]
    log(f"{name:34s} wiki ppl {w.get('ppl', float('nan')):8.3f} kl {w.get('kl', 0):.4f} top1 {w.get('top1', 0):.4f} "
        f"budget {w.get('budget', 0):.4f} | c4ho {row['c4ho'].get('ppl', 0):.3f} c4in {row.get('c4in', {}).get('ppl', 0):.3f}"
        f" (eval {time.time() - t:.1f}s)")
    return row


def uniform(B):
    return {(l, k): B for l in range(NL) for k in lab.KINDS}


def cal(targets, **kw):
    t = time.time()
    sp = lab.calibrate(model, c4cal, targets, **kw)
    if dev == "cuda":
        torch.cuda.synchronize()
    return sp, time.time() - t


rows = {}
# ---------------------------------------------------------------- 1. TEAL uniform
teal_sp = {}
for B in (0.5, 0.4, 0.6):
    if want("teal"):
        sp, tc = cal(uniform(B))
        teal_sp[B] = sp
        rows[("teal", B)] = record(f"teal_uniform_{B}", "teal-uniform", B, sp, tcal=tc)

# ---------------------------------------------------------------- 2. refit
best_lam, best_c4 = None, float("inf")
for lam in (1e-2, 1e-3, 1e-1, 1.0):
    if want("refit", 20):
        stats = {} if lam == 1e-2 else None
        sp, tc = cal(uniform(0.5), refit={"lam": lam, "target": "local", "bias": True}, stats=stats)
        r = record(f"refit_local_lam{lam}_0.5", "refit-local", 0.5, sp, extra={"lam": lam}, tcal=tc)
        if stats:
            json.dump(stats, open(os.path.join(args.out, "refit_local_err.json"), "w"))
            te = sum(v["teal"] for v in stats.values()) / len(stats)
            rf = sum(v["refit"] for v in stats.values()) / len(stats)
            log(f"local rel err (mean over projections, calib): teal {te:.4f} refit {rf:.4f}")
        if r["c4ho"]["ppl"] < best_c4:
            best_c4, best_lam = r["c4ho"]["ppl"], lam
log("best lam by c4 held-out:", best_lam)
lam = best_lam if best_lam is not None else 1e-2
best_target = "local"
if want("refit", 20):
    sp, tc = cal(uniform(0.5), refit={"lam": lam, "target": "dense", "bias": True})
    r = record(f"refit_dense_lam{lam}_0.5", "refit-dense", 0.5, sp, extra={"lam": lam}, tcal=tc)
    if r["c4ho"]["ppl"] < best_c4:
        best_target = "dense"
        best_c4 = r["c4ho"]["ppl"]
if want("refit", 20):
    sp, tc = cal(uniform(0.5), refit={"lam": lam, "target": best_target, "bias": False})
    record(f"refit_{best_target}_nobias_0.5", f"refit-{best_target}-nobias", 0.5, sp, extra={"lam": lam}, tcal=tc)
REFIT = {"lam": lam, "target": best_target, "bias": True}
log("refit choice", REFIT)
for B in (0.4, 0.6):
    if want("refit", 20):
        sp, tc = cal(uniform(B), refit=REFIT)
        record(f"refit_{best_target}_{B}", f"refit-{best_target}", B, sp, extra={"lam": lam}, tcal=tc)

# ---------------------------------------------------------------- 3. TEAL greedy
if want("greedy", 90):
    t = time.time()
    trajs = lab.teal_greedy(model, c4cal[:8], max_target=0.62, log=log)
    log(f"greedy trajectories in {time.time() - t:.1f}s")
    json.dump([[(f, s) for f, s in tr] for tr in trajs], open(os.path.join(args.out, "greedy.json"), "w"))
    for B in (0.5, 0.4, 0.6):
        if want("greedy", 15):
            tg = lab.greedy_targets(trajs, B)
            sp, tc = cal(tg)
            record(f"teal_greedy_{B}", "teal-greedy", B, sp, tcal=tc,
                   extra={"calib_weighted_target": lab.weighted_target(model, tg)})
    if want("greedy", 25):
        tg = lab.greedy_targets(trajs, 0.5)
        sp, tc = cal(tg, refit=REFIT)
        record("teal_greedy+refit_0.5", "teal-greedy+refit", 0.5, sp, tcal=tc,
               extra={"calib_weighted_target": lab.weighted_target(model, tg)})

# ---------------------------------------------------------------- 4. sensitivity knapsack
LEVELS = (0.3, 0.5, 0.7, 0.9)
if want("sens", 90):
    t = time.time()
    sens, dnll = lab.sensitivity(model, c4cal[:16], LEVELS, log=log)
    log(f"sensitivity in {time.time() - t:.1f}s")
    json.dump({f"{l}.{k}.{s}": v for (l, k, s), v in sens.items()}, open(os.path.join(args.out, "sens.json"), "w"))
    for which, nm in ((0, "kl"), (1, "nll")):
        for B in ((0.5, 0.4, 0.6) if which == 0 else (0.5,)):
            if want("sens", 15):
                tg, wt = lab.knapsack(model, sens, LEVELS, B, which=which)
                sp, tc = cal(tg)
                record(f"sens_{nm}_knapsack_{B}", f"sens-{nm}-knapsack", B, sp, tcal=tc,
                       extra={"calib_weighted_target": wt})
    if want("sens", 25):
        tg, wt = lab.knapsack(model, sens, LEVELS, 0.5, which=0)
        sp, tc = cal(tg, refit=REFIT)
        record("sens_kl_knapsack+refit_0.5", "sens-kl-knapsack+refit", 0.5, sp, tcal=tc,
               extra={"calib_weighted_target": wt})

# ---------------------------------------------------------------- 5. SPON
STEPS = 10 if args.smoke else 250
if want("spon", 80) and 0.5 in teal_sp:
    t = time.time()
    sp = lab.spon_train(model, teal_sp[0.5], c4cal, steps=STEPS, lr=1e-3, log=log)
    record("spon_0.5", "teal-uniform+spon", 0.5, sp, extra={"steps": STEPS, "lr": 1e-3, "t_train": time.time() - t})
if want("spon", 90):
    t = time.time()
    sp0, _ = cal(uniform(0.5), refit=REFIT)
    sp = lab.spon_train(model, sp0, c4cal, steps=STEPS, lr=1e-3, log=log)
    record("refit+spon_0.5", "refit+spon", 0.5, sp, extra={"steps": STEPS, "lr": 1e-3, "t_train": time.time() - t})

# ---------------------------------------------------------------- 6. low rank at equal bytes
if want("lowrank", 20):
    # equal sparsity check (the probe): r = 32 at 50% sparsity
    sp, tc = cal(uniform(0.5), lowrank={(l, k): 32 for l in range(NL) for k in lab.KINDS})
    record("lowrank_r32_equal_sparsity_0.5", "lowrank-equal-sparsity", 0.5, sp, tcal=tc)
for r in (8, 16, 32):
    if want("lowrank", 20):
        B = 0.5
        tg, lrk = {}, {}
        for l in range(NL):
            for k in lab.KINDS:
                W = model.L[l][k]
                tg[(l, k)] = min(0.98, B + r * (W.shape[0] + W.shape[1]) / W.numel())
                lrk[(l, k)] = r
        sp, tc = cal(tg, lowrank=lrk)
        record(f"lowrank_r{r}_equal_bytes_0.5", "lowrank-equal-bytes", B, sp, tcal=tc, extra={"rank": r})

# ---------------------------------------------------------------- 7. scores
if want("scores", 30):
    t = time.time()
    cw = lab.attribution_weights(model, c4cal[:16])
    log(f"attribution weights in {time.time() - t:.1f}s")
    sp, tc = cal(uniform(0.5), cw=cw)
    record("attribution_0.5", "score-attribution", 0.5, sp, tcal=tc)
if want("scores", 20):
    cw = {(l, k): model.L[l][k].norm(dim=0) for l in range(NL) for k in lab.KINDS}
    sp, tc = cal(uniform(0.5), cw=cw)
    record("wina_0.5", "score-wina", 0.5, sp, tcal=tc)

# ---------------------------------------------------------------- 8. refit characterisation (if time)
for B in (0.3, 0.7):
    for meth in ("teal", "refit"):
        if want("char", 15):
            sp, tc = cal(uniform(B), refit=REFIT if meth == "refit" else None)
            record(f"{meth}_{B}", "teal-uniform" if meth == "teal" else f"refit-{REFIT['target']}", B, sp, tcal=tc)
for ntok in (8192, 32768):
    for meth in ("refit", "teal"):
        if want("char", 15):
            t = time.time()
            sp = lab.calibrate(model, c4cal[:ntok // 512], uniform(0.5), refit=REFIT if meth == "refit" else None)
            record(f"{meth}_calib{ntok}_0.5", f"{meth}-calib{ntok}", 0.5, sp, tcal=time.time() - t)
for meth in ("teal", "refit"):
    if want("char", 15):
        sp, tc = cal(uniform(0.5), refit=REFIT if meth == "refit" else None)
        sp.dense_before = wiki.shape[1] // 2
        row = {"name": f"{meth}_prefill_half_0.5", "method": meth + "-prefill-half", "budget_target": 0.5}
        for s in ("wiki", "c4ho"):
            r = lab.evaluate(model, refs[s], sp, second_half=True)
            r.pop("achieved", None)
            row[s] = r
        d2 = lab.evaluate(model, refs["wiki"], None, second_half=True)
        row["dense_wiki_2nd_half"] = d2["ppl_2nd_half"]
        RES.write(json.dumps(row) + "\n")
        RES.flush()
        log(row["name"], json.dumps(row["wiki"]), "dense 2nd half", d2["ppl_2nd_half"])
log("done")
