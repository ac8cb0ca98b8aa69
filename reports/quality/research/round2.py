"""Round 2 (final device round) of the quality study, SmolLM2-135M, GPU fp32 / TF32 off.

Round 1 (round1.py) gave dense, TEAL uniform 40/50/60 and the refit ridge sweep (refit lost), then ran out of
time because torch.kthvalue on one huge CUDA slice took ~72 s per calibration (fixed in lab.kth: sort).
This round: TEAL uniform 30/50/70 (50 re-checks round 1), TEAL greedy allocation, sensitivity knapsack (KL and
dNLL), SPON biases (on TEAL and on the best allocation, chosen by c4 held-out perplexity, never by wiki), the
remaining refit checks (no bias, dense-model target), low rank at equal bytes (uniform ranks and a
per-projection measured choice), attribution / WINA scores, and the best configuration at 30-70% and with the
first half of each window dense.
"""

import argparse
import json
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
ap.add_argument("--deadline", type=float, default=520)
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


def record(name, method, budget, sp, extra=None, sets=("wiki", "c4ho", "c4in"), tcal=None, second_half=False):
    t = time.time()
    row = {"name": name, "method": method, "budget_target": budget}
    for s in sets:
        r = lab.evaluate(model, refs[s], sp, second_half=second_half)
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
        f" (cal {tcal if tcal is not None else 0:.1f}s eval {time.time() - t:.1f}s)")
    return row


def uniform(B):
    return {(l, k): B for l in range(NL) for k in lab.KINDS}


def cal(targets, **kw):
    t = time.time()
    sp = lab.calibrate(model, c4cal, targets, **kw)
    if dev == "cuda":
        torch.cuda.synchronize()
    return sp, time.time() - t


# candidates at 50% for the adaptive choice: name -> (c4ho ppl, targets)
cands = {}
# ---------------------------------------------------------------- P0 TEAL uniform
teal_sp = {}
for B in (0.5, 0.3, 0.7):
    if want("teal"):
        sp, tc = cal(uniform(B))
        teal_sp[B] = sp
        r = record(f"teal_uniform_{B}", "teal-uniform", B, sp, tcal=tc)
        if B == 0.5:
            cands["teal-uniform"] = (r["c4ho"]["ppl"], uniform(0.5))

# ---------------------------------------------------------------- P1 TEAL greedy
trajs = None
if want("greedy", 120):
    t = time.time()
    trajs = lab.teal_greedy(model, c4cal[:8], max_target=0.62, log=log, deadline=time.time() + min(150, left() - 200))
    log(f"greedy trajectories in {time.time() - t:.1f}s; final f per layer:",
        [round(tr[-1][0], 3) for tr in trajs])
    json.dump([[(f, s) for f, s in tr] for tr in trajs], open(os.path.join(args.out, "greedy.json"), "w"))
    for B in (0.5, 0.4, 0.6):
        if want("greedy", 12):
            tg = lab.greedy_targets(trajs, B)
            sp, tc = cal(tg)
            r = record(f"teal_greedy_{B}", "teal-greedy", B, sp, tcal=tc,
                       extra={"calib_weighted_target": lab.weighted_target(model, tg)})
            if B == 0.5:
                cands["teal-greedy"] = (r["c4ho"]["ppl"], tg)

# ---------------------------------------------------------------- P2 sensitivity knapsack
LEVELS = (0.3, 0.5, 0.7, 0.9)
sens = None
if want("sens", 100):
    t = time.time()
    sens, dnll = lab.sensitivity(model, c4cal[:16], LEVELS, log=log)
    log(f"sensitivity in {time.time() - t:.1f}s")
    json.dump({f"{l}.{k}.{s}": v for (l, k, s), v in sens.items()}, open(os.path.join(args.out, "sens.json"), "w"))
    for which, nm, Bs in ((0, "kl", (0.5, 0.4, 0.6)), (1, "nll", (0.5,))):
        for B in Bs:
            if want("sens", 12):
                tg, wt = lab.knapsack(model, sens, LEVELS, B, which=which)
                sp, tc = cal(tg)
                r = record(f"sens_{nm}_knapsack_{B}", f"sens-{nm}-knapsack", B, sp, tcal=tc,
                           extra={"calib_weighted_target": wt})
                if B == 0.5:
                    cands[f"sens-{nm}-knapsack"] = (r["c4ho"]["ppl"], tg)

best_alloc = min(cands, key=lambda k: cands[k][0]) if cands else "teal-uniform"
log("best allocation at 50% by c4 held-out ppl:", best_alloc, {k: round(v[0], 3) for k, v in cands.items()})


def alloc_targets(name, B):
    if name == "teal-uniform":
        return uniform(B)
    if name == "teal-greedy":
        return lab.greedy_targets(trajs, B)
    which = 0 if "kl" in name else 1
    return lab.knapsack(model, sens, LEVELS, B, which=which)[0]


# ---------------------------------------------------------------- P3 SPON
STEPS = 10 if args.smoke else 200
spon_best = None
if want("spon", 70) and 0.5 in teal_sp:
    t = time.time()
    sp = lab.spon_train(model, teal_sp[0.5], c4cal, steps=STEPS, lr=1e-3, log=log)
    r = record("spon_0.5", "teal-uniform+spon", 0.5, sp, extra={"steps": STEPS, "lr": 1e-3, "t_train": time.time() - t})
    spon_best = ("teal-uniform", r["c4ho"]["ppl"])
if best_alloc != "teal-uniform" and want("spon", 75):
    t = time.time()
    sp0, _ = cal(alloc_targets(best_alloc, 0.5))
    sp = lab.spon_train(model, sp0, c4cal, steps=STEPS, lr=1e-3, log=log)
    r = record(f"{best_alloc}+spon_0.5", f"{best_alloc}+spon", 0.5, sp,
               extra={"steps": STEPS, "lr": 1e-3, "t_train": time.time() - t})

# ---------------------------------------------------------------- P4 refit checks (round 1: refit lost)
for nm, rf in (("refit_local_lam1_nobias", {"lam": 1.0, "target": "local", "bias": False}),
               ("refit_dense_lam1", {"lam": 1.0, "target": "dense", "bias": True}),
               ("refit_dense_lam1_nobias", {"lam": 1.0, "target": "dense", "bias": False})):
    if want("refit", 25):
        sp, tc = cal(uniform(0.5), refit=rf)
        record(f"{nm}_0.5", "refit", 0.5, sp, tcal=tc, extra={"refit": rf})

# ---------------------------------------------------------------- P5 scores
if want("scores", 25):
    t = time.time()
    cw = lab.attribution_weights(model, c4cal[:16])
    log(f"attribution weights in {time.time() - t:.1f}s")
    sp, tc = cal(uniform(0.5), cw=cw)
    record("attribution_0.5", "score-attribution", 0.5, sp, tcal=tc)
if want("scores", 15):
    cw = {(l, k): model.L[l][k].norm(dim=0) for l in range(NL) for k in lab.KINDS}
    sp, tc = cal(uniform(0.5), cw=cw)
    record("wina_0.5", "score-wina", 0.5, sp, tcal=tc)

# ---------------------------------------------------------------- P6 low rank
if want("lowrank", 15):
    sp, tc = cal(uniform(0.5), lowrank={(l, k): 32 for l in range(NL) for k in lab.KINDS})
    record("lowrank_r32_equal_sparsity_0.5", "lowrank-equal-sparsity", 0.5, sp, tcal=tc, extra={"rank": 32})
for r in (8, 16, 32):
    if want("lowrank", 15):
        B = 0.5
        tg, lrk = {}, {}
        for l in range(NL):
            for k in lab.KINDS:
                W = model.L[l][k]
                tg[(l, k)] = min(0.98, B + r * (W.shape[0] + W.shape[1]) / W.numel())
                lrk[(l, k)] = r
        sp, tc = cal(tg, lowrank=lrk)
        record(f"lowrank_r{r}_equal_bytes_0.5", "lowrank-equal-bytes", B, sp, tcal=tc, extra={"rank": r})
if want("lowrank", 25):
    stats = {}
    sp, tc = cal(uniform(0.5), lowrank_auto={"budget": 0.5, "ranks": (0, 8, 16, 32, 64)}, stats=stats)
    json.dump(stats, open(os.path.join(args.out, "lowrank_auto.json"), "w"))
    from collections import Counter
    log("lowrank auto chosen ranks:", dict(Counter(v["chosen"] for v in stats.values())))
    record("lowrank_auto_equal_bytes_0.5", "lowrank-auto-equal-bytes", 0.5, sp, tcal=tc)

# ---------------------------------------------------------------- P7 best allocation across budgets + prefill
if best_alloc != "teal-uniform":
    for B in (0.3, 0.7):
        if want("char", 12):
            tg = alloc_targets(best_alloc, B)
            sp, tc = cal(tg)
            record(f"{best_alloc}_{B}", best_alloc, B, sp, tcal=tc,
                   extra={"calib_weighted_target": lab.weighted_target(model, tg)})
for nm in ("teal-uniform", best_alloc) if best_alloc != "teal-uniform" else ("teal-uniform",):
    if want("char", 12):
        sp, tc = cal(alloc_targets(nm, 0.5))
        sp.dense_before = wiki.shape[1] // 2
        row = record(f"{nm}_prefill_half_0.5", nm + "-prefill-half", 0.5, sp, tcal=tc, sets=("wiki", "c4ho"),
                     second_half=True)
        log("  2nd-half ppl", row["wiki"].get("ppl_2nd_half"))
if want("char", 5):
    d2 = lab.evaluate(model, refs["wiki"], None, second_half=True)
    RES.write(json.dumps({"name": "dense_2nd_half", "wiki": d2}) + "\n")
    log("dense 2nd-half ppl", d2["ppl_2nd_half"])
if best_alloc != "teal-uniform" and want("char", 70):
    for B in (0.4,):
        t = time.time()
        sp0, _ = cal(alloc_targets(best_alloc, B))
        sp = lab.spon_train(model, sp0, c4cal, steps=STEPS, lr=1e-3, log=log)
        record(f"{best_alloc}+spon_{B}", f"{best_alloc}+spon", B, sp, extra={"steps": STEPS, "t_train": time.time() - t})
log("done")
