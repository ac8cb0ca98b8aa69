"""Self-contained research harness for activation-sparsity quality studies on SmolLM2-135M.

Everything here is plain torch (fp32, TF32 off on GPU): GGUF reading + dequantization (Q4_1, Q8_0, F32),
a Llama decoder matching acttail/runtime/model.py, a per-projection sparsifier with optional refit weights,
output biases, low-rank compensation and per-channel score weights; layer-by-layer calibration (exact
quantiles, upstream thresholds AND upstream refits on); evaluation (perplexity, KL(dense||sparse), top-1
agreement, achieved byte-weighted sparsity); TEAL greedy allocation; sensitivity + Lagrangian knapsack;
SPON-style end-to-end bias training; attribution score weights.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

# ---------------------------------------------------------------------------------------------- GGUF

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path):
    """{name: (ggml_type, hf_shape, bytes)} and metadata (scalars only) of a GGUF v2/v3 file."""
    buf = open(path, "rb").read()
    pos = 0

    def rd(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def rstr():
        nonlocal pos
        n = rd("<Q")
        s = buf[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    def rval(t):
        nonlocal pos
        if t == 8:
            return rstr()
        if t == 9:
            it, n = rd("<I"), rd("<Q")
            if it == 8:
                for _ in range(n):
                    rstr()
            elif it == 9:
                raise ValueError("nested arrays")
            else:
                pos += _SIZES[it] * n
            return None
        return rd(_FMT[t])

    assert buf[:4] == b"GGUF", "not a GGUF file"
    pos = 4
    version, n_t, n_kv = rd("<I"), rd("<Q"), rd("<Q")
    meta = {}
    for _ in range(n_kv):
        k = rstr()
        meta[k] = rval(rd("<I"))
    infos = []
    for _ in range(n_t):
        name = rstr()
        nd = rd("<I")
        dims = [rd("<Q") for _ in range(nd)]
        typ, off = rd("<I"), rd("<Q")
        infos.append((name, dims, typ, off))
    align = meta.get("general.alignment") or 32
    start = (pos + align - 1) // align * align
    out = {}
    for name, dims, typ, off in infos:
        n = int(np.prod(dims))
        nbytes = {0: 4 * n, 1: 2 * n, 3: n // 32 * 20, 8: n // 32 * 34}[typ]
        out[name] = (typ, tuple(reversed(dims)), buf[start + off:start + off + nbytes])
    return out, meta


def dequant(typ, shape, raw):
    n = int(np.prod(shape))
    if typ == 0:
        a = np.frombuffer(raw, dtype=np.float32, count=n).copy()
    elif typ == 1:
        a = np.frombuffer(raw, dtype=np.float16, count=n).astype(np.float32)
    elif typ == 8:  # Q8_0: fp16 d, 32 x int8
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].copy().view(np.int8).astype(np.float32)
        a = (d * q).reshape(-1)
    elif typ == 3:  # Q4_1: fp16 d, fp16 m, 16 bytes (low nibbles = first 16 values, high = last 16)
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 20)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = b[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        a = ((d * q) + m).reshape(-1)
    else:
        raise ValueError(f"ggml type {typ}")
    return torch.from_numpy(a.reshape(shape))


def unpermute_rotary(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLK = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
        "ffn_down": "down", "attn_norm": "ln1", "ffn_norm": "ln2"}


# --------------------------------------------------------------------------------------------- model

@dataclass
class Cfg:
    dim: int = 576
    n_layer: int = 30
    n_head: int = 9
    n_kv: int = 3
    head_dim: int = 64
    inter: int = 1536
    eps: float = 9.999999747378752e-06
    rope_base: float = 100000.0
    vocab: int = 49152


class Model:
    def __init__(self, cfg: Cfg, emb, norm, layers, device):
        self.cfg = cfg
        self.dev = torch.device(device)
        self.emb = emb.to(self.dev)
        self.norm = norm.to(self.dev)
        self.L = [{k: v.to(self.dev).contiguous() for k, v in d.items()} for d in layers]
        d = cfg.head_dim
        inv = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        fr = torch.outer(torch.arange(1024, dtype=torch.float32), inv)
        e = torch.cat([fr, fr], -1)
        self.cos, self.sin = e.cos().to(self.dev), e.sin().to(self.dev)

    @classmethod
    def from_gguf(cls, path, device, n_layer=None):
        cfg = Cfg()
        t, meta = read_gguf(path)
        nl = n_layer or cfg.n_layer
        cfg.n_layer = nl
        layers = [dict() for _ in range(nl)]
        emb = norm = None
        for name, (typ, shape, raw) in t.items():
            if name == "token_embd.weight":
                emb = dequant(typ, shape, raw)
            elif name == "output_norm.weight":
                norm = dequant(typ, shape, raw)
            elif name.startswith("blk."):
                _, i, part, _ = name.split(".")
                i = int(i)
                if i >= nl:
                    continue
                w = dequant(typ, shape, raw)
                k = _BLK[part]
                if k == "q":
                    w = unpermute_rotary(w, cfg.n_head)
                elif k == "k":
                    w = unpermute_rotary(w, cfg.n_kv)
                layers[i][k] = w.contiguous()
        return cls(cfg, emb, norm, layers, device)

    @classmethod
    def from_safetensors(cls, path, device, n_layer=None):
        from safetensors.torch import load_file
        sd = load_file(path)
        cfg = Cfg()
        nl = n_layer or cfg.n_layer
        cfg.n_layer = nl
        layers = []
        for i in range(nl):
            p = f"model.layers.{i}."
            d = {k: sd[p + f"self_attn.{k}_proj.weight"] for k in "qkvo"}
            d |= {k: sd[p + f"mlp.{k}_proj.weight"] for k in ("gate", "up", "down")}
            d["ln1"], d["ln2"] = sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"]
            layers.append(d)
        return cls(cfg, sd["model.embed_tokens.weight"], sd["model.norm.weight"], layers, device)

    # -- pieces
    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps))

    def nparams(self, k):
        W = self.L[0][k]
        return W.shape[0] * W.shape[1]

    def attn_core(self, l, x, sp):
        c = self.cfg
        B, T, _ = x.shape
        q = proj(self, l, "q", x, sp).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = proj(self, l, "k", x, sp).view(B, T, c.n_kv, c.head_dim).transpose(1, 2)
        v = proj(self, l, "v", x, sp).view(B, T, c.n_kv, c.head_dim).transpose(1, 2)
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_kv != c.n_head)
        return y.transpose(1, 2).reshape(B, T, -1)

    def block(self, l, h, sp):
        L = self.L[l]
        h = h + proj(self, l, "o", self.attn_core(l, self.rms(h, L["ln1"]), sp), sp)
        x = self.rms(h, L["ln2"])
        a = F.silu(proj(self, l, "gate", x, sp)) * proj(self, l, "up", x, sp)
        return h + proj(self, l, "down", a, sp)

    def hidden(self, idx, sp, start=0, h=None):
        if h is None:
            h = F.embedding(idx, self.emb)
        if sp is not None:
            sp.T = h.shape[1]
        for l in range(start, self.cfg.n_layer):
            h = self.block(l, h, sp)
        return h

    def logits(self, h):
        return F.linear(self.rms(h, self.norm), self.emb)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SP:
    """Per-projection sparsification settings. Keys are (layer, kind)."""

    def __init__(self):
        self.thr = {}      # threshold on the score (|x| or |x| * cw)
        self.cw = {}       # per-channel score weights [d_in]
        self.Wp = {}       # replacement weights for sparse positions (refit)
        self.bias = {}     # output bias for sparse positions [d_out] (refit bias, SPON)
        self.lr = {}       # (A [d_out, r], B [r, d_in]): y += A (B (x - s))
        self.dense_before = 0
        self.count = False
        self.T = None
        self.z = {}
        self.n = {}

    def copy(self):
        o = SP()
        for a in ("thr", "cw", "Wp", "bias", "lr"):
            setattr(o, a, dict(getattr(self, a)))
        o.dense_before = self.dense_before
        return o

    def reset(self):
        self.z, self.n = {}, {}

    def achieved(self):
        return {k: float(self.z[k]) / self.n[k] for k in self.z}


def proj(model, l, k, x, sp):
    W = model.L[l][k]
    key = (l, k)
    if sp is None or key not in sp.thr:
        return F.linear(x, W)
    cw = sp.cw.get(key)
    sc = x.abs() if cw is None else x.abs() * cw
    m = sc > sp.thr[key]
    s = x * m
    y = F.linear(s, sp.Wp.get(key, W), sp.bias.get(key))
    lr = sp.lr.get(key)
    if lr is not None:
        y = y + F.linear(F.linear(x - s, lr[1]), lr[0])
    if sp.dense_before > 0:
        T = x.shape[-2]
        rows = torch.arange(T, device=x.device) >= sp.dense_before
        y = torch.where(rows[:, None], y, F.linear(x, W))
        if sp.count:
            mm = m[..., rows, :]
            sp.z[key] = sp.z.get(key, 0) + (~mm).sum()
            sp.n[key] = sp.n.get(key, 0) + mm.numel()
    elif sp.count:
        sp.z[key] = sp.z.get(key, 0) + (~m).sum()
        sp.n[key] = sp.n.get(key, 0) + m.numel()
    return y


# ------------------------------------------------------------------------------------------- bytes

def byte_budget(model, achieved: dict, sp: SP | None = None):
    """Fraction of projection bytes NOT read per token (net of biases and low-rank factors added)."""
    tot = read = extra = 0.0
    for l in range(model.cfg.n_layer):
        for k in KINDS:
            n = model.nparams(k)
            tot += n
            read += (1.0 - achieved.get((l, k), 0.0)) * n
            if sp is not None:
                W = model.L[l][k]
                if (l, k) in sp.bias:
                    extra += W.shape[0]
                if (l, k) in sp.lr:
                    A, B = sp.lr[(l, k)]
                    extra += A.numel() + B.numel()
    return 1.0 - (read + extra) / tot, extra / tot


def weighted_target(model, targets):
    tot = s = 0.0
    for l in range(model.cfg.n_layer):
        for k in KINDS:
            n = model.nparams(k)
            tot += n
            s += targets.get((l, k), 0.0) * n
    return s / tot


# ---------------------------------------------------------------------------------------- evaluate

class DenseRef:
    """Dense log-probs of a window set, kept on the device for KL / top-1."""

    def __init__(self, model, wins, batch=16):
        self.wins, self.batch, self.lp = wins, batch, []
        nll, cnt = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(wins), batch):
                b = wins[i:i + batch].to(model.dev)
                lp = torch.log_softmax(model.logits(model.hidden(b, None))[:, :-1].float(), -1)
                tgt = b[:, 1:]
                nll += float(-lp.gather(-1, tgt[..., None]).sum())
                cnt += tgt.numel()
                self.lp.append(lp)
        self.nll = nll / cnt
        self.ppl = math.exp(self.nll)


@torch.no_grad()
def evaluate(model, ref: DenseRef, sp: SP | None, second_half=False):
    wins, batch = ref.wins, ref.batch
    nll = kl = top = 0.0
    nll2 = cnt2 = 0.0
    cnt = 0
    if sp is not None:
        sp.count = True
        sp.reset()
    for j, i in enumerate(range(0, len(wins), batch)):
        b = wins[i:i + batch].to(model.dev)
        lp = torch.log_softmax(model.logits(model.hidden(b, sp))[:, :-1].float(), -1)
        if not torch.isfinite(lp).all():
            return {"error": "non-finite"}
        d = ref.lp[j]
        tgt = b[:, 1:]
        tok_nll = -lp.gather(-1, tgt[..., None])[..., 0]
        nll += float(tok_nll.sum())
        kl += float((d.exp() * (d - lp)).sum())
        top += float((d.argmax(-1) == lp.argmax(-1)).sum())
        cnt += tgt.numel()
        T = b.shape[1]
        if second_half:
            h0 = T // 2
            nll2 += float(tok_nll[:, h0:].sum())
            cnt2 += tok_nll[:, h0:].numel()
    out = {"ppl": math.exp(nll / cnt), "nll": nll / cnt, "kl": kl / cnt, "top1": top / cnt, "n": cnt}
    if second_half:
        out["ppl_2nd_half"] = math.exp(nll2 / cnt2)
    if sp is not None:
        sp.count = False
        ach = sp.achieved()
        out["budget"], out["extra"] = byte_budget(model, ach, sp)
        out["achieved"] = {f"{l}.{k}": v for (l, k), v in ach.items()}
    return out


# --------------------------------------------------------------------------------------- calibrate

def kth(v, s, presorted=False):
    """threshold t with fraction(v <= t) = s (v flat). Device-wide sort (torch.kthvalue on one huge CUDA
    slice runs in one thread block: ~0.6 s per call, which made round 1's calibrations take 72 s)."""
    n = v.numel()
    kk = int(round(s * n))
    if kk <= 0:
        return -1.0
    kk = min(kk, n)
    srt = v if presorted else torch.sort(v).values
    return float(srt[kk - 1])


def refit_solve(W, Xt, S, lam, bias=True):
    """W' (and b') minimising ||W Xt - W' S - b'||^2 + lam * sum_j C_jj ||W'_j - W_j||^2 (rows = tokens).

    C = S~^T S~ (S~ = [S, 1]); the ridge pulls each column towards the original weights (lam -> inf gives
    W' = W, TEAL), scaled per channel by its kept energy C_jj. Closed form:
    W~' = (W Cx + lam W D)(C + lam D)^-1, Cx = Xt^T S~, D = diag(C) (0 for the bias column)."""
    d = S.shape[1]
    Sd = S.double()
    if bias:
        Sd = torch.cat([Sd, torch.ones(len(Sd), 1, dtype=Sd.dtype, device=Sd.device)], 1)
    C = Sd.T @ Sd
    Cx = Xt.double().T @ Sd
    diag = torch.diagonal(C).clone()
    reg = lam * diag
    reg[:d] += 1e-9 * float(diag[:d].mean()) + 1e-30
    if bias:
        reg[d] = 0.0
    A = C + torch.diag(reg)
    M = W.double() @ Cx
    M[:, :d] += W.double() * (lam * diag[:d])
    Wp = torch.linalg.solve(A, M.T).T
    if bias:
        return Wp[:, :d].float().contiguous(), Wp[:, d].float().contiguous()
    return Wp.float().contiguous(), None


_SVD = {}


def svd_cached(model, key):
    if key not in _SVD:
        _SVD[key] = torch.linalg.svd(model.L[key[0]][key[1]].double(), full_matrices=False)
    return _SVD[key]


def rel_err(W, Xt, S, Wp, b):
    Y = Xt @ W.T
    E = Y - (S @ Wp.T + (b if b is not None else 0))
    return float(E.pow(2).sum() / Y.pow(2).sum())


@torch.no_grad()
def calibrate(model, wins, targets: dict, *, refit=None, cw=None, lowrank=None, batch=32, log=None, stats=None,
              fix_thr=None, lowrank_auto=None):
    """SP with thresholds for ``targets`` {(l,k): s}, layer by layer with upstream sparsity (and refits) on.

    refit: None or {"lam": float, "target": "local"|"dense", "bias": bool, "kinds": set|None}
    cw: {(l,k): weights} score weights.  lowrank: {(l,k): rank}  (R-Sparse U_r S_r V_r^T on x - s).
    fix_thr: {(l,k): t} use these thresholds instead of fitting (for refit on top of given thresholds).
    stats: dict to fill with per-projection local relative errors.
    """
    sp = SP()
    if cw:
        sp.cw = dict(cw)
    dense_t = refit is not None and refit.get("target") == "dense"
    N, T = wins.shape
    hs = F.embedding(wins.to(model.dev), model.emb)
    hd = hs.clone() if dense_t else None
    D = model.cfg.dim

    def fit(l, kinds, x, xd):
        X = x.reshape(-1, x.shape[-1])
        Xd = xd.reshape(-1, x.shape[-1]) if xd is not None else None
        absx = None
        for k in kinds:
            key = (l, k)
            s = targets.get(key, 0.0)
            if (fix_thr is None and s <= 0) or (fix_thr is not None and key not in fix_thr):
                continue
            if fix_thr is not None:
                t = fix_thr[key]
            elif key in sp.cw:
                t = kth((X.abs() * sp.cw[key]).flatten(), s)
            else:
                if absx is None:
                    absx = torch.sort(X.abs().flatten()).values
                t = kth(absx, s, presorted=True)
            sp.thr[key] = t
            W = model.L[l][k]
            if lowrank_auto is not None and absx is None and key not in sp.cw:
                absx = torch.sort(X.abs().flatten()).values
            need_s = lowrank_auto is not None or (refit is not None and (refit.get("kinds") is None or k in refit["kinds"])) or \
                (lowrank and lowrank.get(key, 0) > 0) or stats is not None
            if not need_s:
                continue
            sc = X.abs() if key not in sp.cw else X.abs() * sp.cw[key]
            S = X * (sc > t)
            if lowrank_auto is not None:
                B = lowrank_auto["budget"]
                U, Sv, Vh = svd_cached(model, key)
                sub = X[:8192]
                Y = sub @ W.T
                best = None
                rec = {}
                for r in lowrank_auto["ranks"]:
                    sr = min(0.98, B + r * (W.shape[0] + W.shape[1]) / W.numel())
                    tr = kth(absx if absx is not None else torch.sort(X.abs().flatten()).values, sr, presorted=True)
                    Ss = sub * (sub.abs() > tr)
                    A_, B_ = (U[:, :r] * Sv[:r]).float(), Vh[:r].float()
                    Yh = Ss @ W.T + ((sub - Ss) @ B_.T) @ A_.T if r > 0 else Ss @ W.T
                    e = float((Y - Yh).pow(2).sum() / Y.pow(2).sum())
                    rec[r] = e
                    if best is None or e < best[0]:
                        best = (e, r, sr, tr, A_.contiguous(), B_.contiguous())
                _, r, sr, tr, A_, B_ = best
                sp.thr[key] = tr
                if r > 0:
                    sp.lr[key] = (A_, B_)
                if stats is not None:
                    stats[f"{l}.{k}"] = {"err_by_rank": rec, "chosen": r, "sparsity": sr}
                continue
            if lowrank and lowrank.get(key, 0) > 0:
                r = lowrank[key]
                U, Sv, Vh = svd_cached(model, key)
                sp.lr[key] = ((U[:, :r] * Sv[:r]).float().contiguous(), Vh[:r].float().contiguous())
            if refit is not None and (refit.get("kinds") is None or k in refit["kinds"]):
                Xt = Xd if dense_t else X
                Wp, b = refit_solve(W, Xt, S, refit["lam"], refit.get("bias", True))
                sp.Wp[key] = Wp
                if b is not None:
                    sp.bias[key] = b
                if stats is not None:
                    sub = slice(0, min(len(X), 16384))
                    stats[f"{l}.{k}"] = {"teal": rel_err(W, (Xt)[sub], S[sub], W, None),
                                         "refit": rel_err(W, (Xt)[sub], S[sub], Wp, b)}
            elif stats is not None:
                sub = slice(0, min(len(X), 16384))
                stats[f"{l}.{k}"] = {"teal": rel_err(W, X[sub], S[sub], W, None)}
            del S

    for l in range(model.cfg.n_layer):
        L = model.L[l]
        x = model.rms(hs, L["ln1"])
        xd = model.rms(hd, L["ln1"]) if dense_t else None
        fit(l, ("q", "k", "v"), x, xd)
        y = torch.cat([model.attn_core(l, x[i:i + batch], sp) for i in range(0, N, batch)])
        yd = torch.cat([model.attn_core(l, xd[i:i + batch], None) for i in range(0, N, batch)]) if dense_t else None
        fit(l, ("o",), y, yd)
        hs = hs + proj(model, l, "o", y, sp)
        if dense_t:
            hd = hd + F.linear(yd, L["o"])
        del y, yd, x, xd
        x = model.rms(hs, L["ln2"])
        xd = model.rms(hd, L["ln2"]) if dense_t else None
        ad = F.silu(F.linear(xd, L["gate"])) * F.linear(xd, L["up"]) if dense_t else None
        fit(l, ("gate", "up"), x, xd)
        a = F.silu(proj(model, l, "gate", x, sp)) * proj(model, l, "up", x, sp)
        fit(l, ("down",), a, ad)
        hs = hs + proj(model, l, "down", a, sp)
        if dense_t:
            hd = hd + F.linear(ad, L["down"])
        del a, ad, x, xd
    return sp


# ----------------------------------------------------------------------------------- allocations

def teal_greedy(model, wins, max_target=0.65, base_step=0.05, last_fraction=0.25, log=print, deadline=None):
    """TEAL greedyopt: per block (dense inputs), raise the projection whose step (equal params) costs least
    block-output error, until the block's param-weighted sparsity reaches max_target. Returns per-layer
    trajectories [(f, {kind: s})]."""
    c = model.cfg
    w = {k: model.nparams(k) / model.nparams("q") for k in KINDS}
    W = sum(w.values())
    step = {k: base_step / w[k] for k in KINDS}
    h = F.embedding(wins.to(model.dev), model.emb)
    trajs = []
    T = wins.shape[1]
    st = int(T * (1 - last_fraction))
    with torch.no_grad():
        for l in range(c.n_layer):
            L = model.L[l]
            x1 = model.rms(h, L["ln1"])
            y = model.attn_core(l, x1, None)
            hm = h + F.linear(y, L["o"])
            x2 = model.rms(hm, L["ln2"])
            a = F.silu(F.linear(x2, L["gate"])) * F.linear(x2, L["up"])
            target = hm + F.linear(a, L["down"])
            srt = {}
            for k, src in (("q", x1), ("o", y), ("gate", x2), ("down", a)):
                srt[k] = src.abs().flatten().sort().values
            srt["k"] = srt["v"] = srt["q"]
            srt["up"] = srt["gate"]

            grid = {}
            for k in KINDS:
                v = srt[k]
                ss = torch.tensor([min(j * step[k], 0.999) for j in range(int(1 / step[k]) + 2)])
                idx = (ss * v.numel()).round().long().clamp(1, v.numel()) - 1
                grid[k] = v[idx.to(v.device)].cpu().tolist()

            def thr(k, s):
                j = int(round(s / step[k]))
                return -1.0 if j <= 0 else grid[k][j]

            def err(sps):
                sp = SP()
                for k, s in sps.items():
                    if s > 0:
                        sp.thr[(l, k)] = thr(k, s)
                out = model.block(l, h, sp)
                return float(torch.norm(target[:, st:] - out[:, st:], dim=-1).mean())

            cur = {k: 0.0 for k in KINDS}
            traj = [(0.0, dict(cur))]
            f = 0.0
            while f < max_target and (deadline is None or time.time() < deadline):
                best, bk = float("inf"), None
                for k in KINDS:
                    if cur[k] + step[k] > 0.99:
                        continue
                    tmp = dict(cur)
                    tmp[k] += step[k]
                    e = err(tmp)
                    if e < best:
                        best, bk = e, k
                if bk is None:
                    break
                cur[bk] += step[bk]
                f = sum(cur[k] * w[k] for k in KINDS) / W
                traj.append((f, dict(cur)))
            trajs.append(traj)
            h = target
            if log and l % 10 == 0:
                log(f"greedy layer {l}: {traj[-1]}")
    return trajs


def greedy_targets(trajs, budget):
    out = {}
    for l, traj in enumerate(trajs):
        pick = next((sp for f, sp in traj if f >= budget - 1e-9), traj[-1][1])
        for k, s in pick.items():
            if s > 0:
                out[(l, k)] = s
    return out


@torch.no_grad()
def sensitivity(model, wins, levels=(0.3, 0.5, 0.7, 0.9), log=print):
    """KL(dense||sparse) and dNLL on wins when one projection alone is sparsified at each level."""
    c = model.cfg
    dev = model.dev
    b = wins.to(dev)
    hs = [F.embedding(b, model.emb)]
    thr = {}
    h = hs[0]
    for l in range(c.n_layer):
        L = model.L[l]
        x1 = model.rms(h, L["ln1"])
        y = model.attn_core(l, x1, None)
        hm = h + F.linear(y, L["o"])
        x2 = model.rms(hm, L["ln2"])
        a = F.silu(F.linear(x2, L["gate"])) * F.linear(x2, L["up"])
        for ks, src in ((("q", "k", "v"), x1), (("o",), y), (("gate", "up"), x2), (("down",), a)):
            v = src.abs().flatten().sort().values
            for s in levels:
                t = float(v[int(round(s * v.numel())) - 1])
                for k in ks:
                    thr[(l, k, s)] = t
        h = hm + F.linear(a, L["down"])
        hs.append(h)
    tgt = b[:, 1:]

    def score(hf):
        lp = torch.log_softmax(model.logits(hf)[:, :-1], -1)
        return lp

    dlp = score(h)
    dnll = float(-dlp.gather(-1, tgt[..., None]).mean())
    res = {}
    for l in range(c.n_layer):
        for k in KINDS:
            for s in levels:
                sp = SP()
                sp.thr[(l, k)] = thr[(l, k, s)]
                hf = model.hidden(None, sp, start=l, h=hs[l])
                lp = score(hf)
                kl = float((dlp.exp() * (dlp - lp)).sum(-1).mean())
                nll = float(-lp.gather(-1, tgt[..., None]).mean())
                res[(l, k, s)] = (kl, nll - dnll)
        if log and l % 10 == 0:
            log(f"sensitivity layer {l} done")
    return res, dnll


def knapsack(model, sens, levels, budget, which=0, grid=0.01):
    """Per-projection sparsities minimising sum of interpolated costs s.t. param-weighted sparsity = budget
    (Lagrangian on the convex hull of each projection's cost curve)."""
    c = model.cfg
    xs = np.array([0.0] + list(levels))
    g = np.arange(0, max(levels) + 1e-9, grid)
    curves = {}
    for l in range(c.n_layer):
        for k in KINDS:
            ys = np.array([0.0] + [max(sens[(l, k, s)][which], 0.0) for s in levels])
            ys = np.maximum.accumulate(ys)
            curves[(l, k)] = np.interp(g, xs, ys)
    n = {k: model.nparams(k) for k in KINDS}
    tot = sum(n.values()) * c.n_layer

    def alloc(mu):
        out = {}
        for key, cv in curves.items():
            obj = cv - mu * g * n[key[1]] / tot
            out[key] = float(g[int(np.argmin(obj))])
        return out

    def wt(a):
        return sum(a[key] * n[key[1]] for key in a) / tot

    lo, hi = 0.0, 1.0
    while wt(alloc(hi)) < budget:
        hi *= 2
        if hi > 1e9:
            break
    for _ in range(60):
        mid = (lo + hi) / 2
        if wt(alloc(mid)) < budget:
            lo = mid
        else:
            hi = mid
    a = alloc(hi)
    return {k: v for k, v in a.items() if v > 0}, wt(a)


# ----------------------------------------------------------------------------------------- SPON

def spon_train(model, sp_base, wins, steps=300, lr=1e-3, batch=8, seed=0, log=print):
    """Per-projection output biases (added to any existing bias) trained with KL(dense||sparse)."""
    g = torch.Generator().manual_seed(seed)
    sp = sp_base.copy()
    params = {}
    for key in sp.thr:
        d_out = model.L[key[0]][key[1]].shape[0]
        p = torch.zeros(d_out, device=model.dev, requires_grad=True)
        params[key] = p
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    base_bias = dict(sp_base.bias)
    t0 = time.time()
    for it in range(steps):
        idx = torch.randint(0, len(wins), (batch,), generator=g)
        b = wins[idx].to(model.dev)
        with torch.no_grad():
            dl = torch.log_softmax(model.logits(model.hidden(b, None)), -1)
        for key, p in params.items():
            sp.bias[key] = p + base_bias[key] if key in base_bias else p
        lp = torch.log_softmax(model.logits(model.hidden(b, sp)), -1)
        loss = (dl.exp() * (dl - lp)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (it % 50 == 0 or it == steps - 1):
            log(f"spon step {it} kl {loss.item():.4f} ({time.time() - t0:.1f}s)")
    out = sp_base.copy()
    for key, p in params.items():
        out.bias[key] = (p.detach() + base_bias[key]) if key in base_bias else p.detach().clone()
    return out


# ------------------------------------------------------------------------------------ attribution

def attribution_weights(model, wins, batch=4):
    """c_i = E|dNLL/dx_i| at each projection's input (dense model), per (l, k)."""
    acc = {}
    cnt = 0
    for i in range(0, len(wins), batch):
        b = wins[i:i + batch].to(model.dev)
        probes = {}

        def fwd():
            h = F.embedding(b, model.emb).requires_grad_(True)
            for l in range(model.cfg.n_layer):
                h = probe_block(model, l, h, probes)
            lp = torch.log_softmax(model.logits(h)[:, :-1], -1)
            return -lp.gather(-1, b[:, 1:, None]).mean()

        loss = fwd()
        keys = list(probes)
        grads = torch.autograd.grad(loss, [probes[k] for k in keys])
        for k, gr in zip(keys, grads):
            v = gr.abs().sum(dim=(0, 1)).detach()
            acc[k] = acc.get(k, 0) + v
        cnt += b.shape[0] * b.shape[1]
    return {k: v / cnt for k, v in acc.items()}


def probe_block(model, l, h, probes):
    c = model.cfg
    L = model.L[l]

    def P(k, x):
        xi = x * 1.0
        probes[(l, k)] = xi
        return F.linear(xi, L[k])

    x = model.rms(h, L["ln1"])
    B, T, _ = x.shape
    q = P("q", x).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
    k = P("k", x).view(B, T, c.n_kv, c.head_dim).transpose(1, 2)
    v = P("v", x).view(B, T, c.n_kv, c.head_dim).transpose(1, 2)
    q, k = rope(q, model.cos[:T], model.sin[:T]), rope(k, model.cos[:T], model.sin[:T])
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(B, T, -1)
    h = h + P("o", y)
    x = model.rms(h, L["ln2"])
    a = F.silu(P("gate", x)) * P("up", x)
    return h + P("down", a)
