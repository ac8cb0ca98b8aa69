"""Rotated activations (issue 20, LaRoSa-style), simulated on a transformers model, at equal bytes: does an
orthogonal rotation of each block's input make TEAL's recipe (uniform sparsity, magnitude thresholds from
calibration quantiles, no compensation) cheaper, once the rotation's own bytes are paid?

    python benchmarks/rotation_study.py MODEL --out OUT [--budgets 0.3 0.4 0.5 0.6 0.7] [--tokens 8192]

Rotations (each a PCA of the inputs on the calibration text, eigenvectors by decreasing variance):
  none    TEAL's recipe as it is.
  global  one rotation for the whole residual stream, norm weights folded into the projections: free (it can
          be written into the checkpoint), the sparsified vector is h / rms(h) Q.
  layer   one rotation per layer for its attention and MLP inputs (the residual stream kept in that layer's
          basis): a d x d matrix read per layer and token, paid from the budget.
  site    one rotation per input (q/k/v and gate/up each): two d x d matrices per layer and token.
``--block B``: the layer rotation block-diagonal, a PCA of each B x B diagonal block of the covariance (B / d of
the bytes): a cheaper rotation.
o_proj and down_proj inputs are not rotated. Equal bytes: with budget B (the fraction of projection bytes skipped), a rotation
that reads R bytes a token runs its projections at sparsity B + R / (projection bytes), so both read the same.
The thresholds are the |x| quantile of each projection input on ``--cal-tokens`` c4 tokens; the perplexity,
KL and top-1 agreement to the dense model on the first ``--tokens`` wiki tokens (ctx 512, every position
sparsified, BOS where the tokenizer asks for it). CPU, float32. Writes OUT/rotations.json and .md.

Its budgets are nominal: the sparsity each threshold gives in the sparse run on wiki is not measured, and the
rotated inputs do not hold theirs (they keep more than the c4 quantile says), so its equal-bytes rows flatter
the rotation. ``acttail rotate`` + ``quality_study.py`` measure it at measured bytes (reports/quality/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from acttail.runtime.tokens import bos_id, load_tokenizer, text_tokens, windows
from acttail.text import read_text

COST = {"none": 0, "global": 0, "layer": 1, "site": 2}  # d x d matrices read per layer and token


def sites(model):
    """(name, the linears sharing its input, the RMSNorm in front or None) of every projection input."""
    out = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        out += [(f"{i}.qkv", [a.q_proj, a.k_proj, a.v_proj], layer.input_layernorm), (f"{i}.o", [a.o_proj], None),
                (f"{i}.gate_up", [m.gate_proj, m.up_proj], layer.post_attention_layernorm),
                (f"{i}.down", [m.down_proj], None)]
    return out


def collect(model, wins, names, every=4):
    """Every ``every``-th input row of each site on the windows (float32 [rows, in])."""
    got = {n: [] for n, _, _ in names}
    hooks = [lins[0].register_forward_pre_hook(
        lambda mod, inp, n=n: got[n].append(inp[0].reshape(-1, inp[0].shape[-1])[::every].clone()))
        for n, lins, _ in names]
    with torch.no_grad():
        for w in wins:
            model(w[None])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def covariance(x):
    """The uncentred covariance [d, d] of rows x, in float64."""
    return x.T.double() @ x.double() / x.shape[0]


def pca(c):
    """Eigenvectors of a covariance c by decreasing eigenvalue: an orthogonal [d, d]."""
    return torch.linalg.eigh(c)[1].flip(1).float()


def rotations(kind, names, X, block=0):
    """site -> (rotation Q, whether the norm weight is folded) for the rotated sites (``block``: the layer
    rotation block-diagonal, blocks of that many rows)."""
    main = [(n, norm) for n, _, norm in names if norm is not None]
    if kind == "none":
        return {}
    if kind == "site":  # the input itself, norm weight included, rotated online
        return {n: (pca(covariance(X[n])), False) for n, _ in main}
    unit = {n: X[n] / norm.weight.detach().float() for n, norm in main}  # h / rms(h): the norm weight folded
    if kind == "global":
        g = pca(sum(covariance(u) for u in unit.values()))
        return {n: (g, True) for n, _ in main}
    out = {}
    for layer in dict.fromkeys(n.split(".")[0] for n, _ in main):  # layer: its two inputs share one basis
        c = covariance(unit[f"{layer}.qkv"]) + covariance(unit[f"{layer}.gate_up"])
        q = pca(c) if not block else torch.block_diag(
            *[pca(c[j:j + block, j:j + block]) for j in range(0, c.shape[0], block)])
        out[f"{layer}.qkv"] = out[f"{layer}.gate_up"] = (q, True)
    return out


class Rotated:
    """The model's projections computing sparsify(x Q) (W diag(g)? Q)^T: hooks and rotated weight copies."""

    def __init__(self, model, names, rots):
        self.names, self.rots, self.thr = names, rots, {}
        self.magnitudes = None  # site -> |transformed calibration input|, flat (made once, for every sparsity)
        self.orig = {id(lin): lin.weight.data for _, lins, _ in names for lin in lins}
        self.hooks = []
        for n, lins, norm in names:
            for lin in lins:
                w = self.orig[id(lin)]
                if n in rots:
                    q, fold = rots[n]
                    lin.weight.data = (w * norm.weight.detach()[None, :] if fold else w) @ q
                self.hooks.append(lin.register_forward_pre_hook(self._pre(n, norm)))

    def transform(self, n, norm, x):
        if n not in self.rots:
            return x
        q, fold = self.rots[n]
        return (x / norm.weight.detach() if fold else x) @ q

    def _pre(self, n, norm):
        def hook(mod, inp):
            x = self.transform(n, norm, inp[0])
            t = self.thr.get(n, -1.0)
            return (torch.where(x.abs() > t, x, torch.zeros_like(x)),)
        return hook

    def calibrate(self, X, sparsity):
        """Each site's threshold: the ``sparsity`` quantile of its |transformed input| on the calibration rows."""
        if self.magnitudes is None:
            self.magnitudes = {n: self.transform(n, norm, X[n]).abs().flatten() for n, _, norm in self.names}
        for n, z in self.magnitudes.items():
            k = max(1, int(round(sparsity * z.numel())))
            self.thr[n] = z.kthvalue(k).values.item() if sparsity > 0 else -1.0

    def remove(self):
        for h in self.hooks:
            h.remove()
        for _, lins, _ in self.names:
            for lin in lins:
                lin.weight.data = self.orig[id(lin)]


def score(model, wins, dense_logp):
    """(perplexity, KL to dense, top-1 agreement) over the windows (dense_logp: per window, or None)."""
    nll = kl = agree = n = 0.0
    out = []
    with torch.no_grad():
        for i, w in enumerate(wins):
            logp = F.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
            nll += -logp.gather(1, w[1:, None]).sum().item()
            n += w.numel() - 1
            if dense_logp is None:
                out.append(logp.half())
                continue
            ref = dense_logp[i].float()
            kl += (ref.exp() * (ref - logp)).sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
    return math.exp(nll / n), kl / n, agree / n, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--rotations", nargs="+", default=["none", "global", "layer", "site"], choices=list(COST))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--cal-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--block", type=int, default=0, help="the layer rotation block-diagonal, blocks of this size")
    args = ap.parse_args()
    t0 = time.time()
    tok, bos = load_tokenizer(args.model), bos_id(args.model)
    cal, ev = (windows(text_tokens(tok, read_text(name), n), args.ctx, args.ctx, name, bos)
               for name, n in (("c4", args.cal_tokens), ("wiki", args.tokens)))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    names = sites(model)
    cfg = model.config
    proj = sum(lin.weight.numel() for _, lins, _ in names for lin in lins)
    d2 = cfg.num_hidden_layers * cfg.hidden_size ** 2
    X = collect(model, cal, names)
    dense_ppl, _, _, dense_logp = score(model, ev, None)
    print(f"dense {dense_ppl:.3f}", flush=True)
    rows = []
    for kind in args.rotations:
        rot = Rotated(model, names, rotations(kind, names, X, args.block))
        extra = COST[kind] * d2 / proj * (args.block / cfg.hidden_size if args.block and kind == "layer" else 1)
        kind = f"{kind}, blocks of {args.block}" if args.block and kind == "layer" else kind
        for budget in args.budgets:
            for label, s in (("equal bytes", budget + extra), ("same projection sparsity", budget)):
                if label == "same projection sparsity" and extra == 0:
                    continue
                rot.calibrate(X, s)
                ppl, kl, top1, _ = score(model, ev, dense_logp)
                rows.append(dict(rotation=kind, budget=budget, compare=label, projection_sparsity=round(s, 4),
                                 rotation_bytes_fraction=round(extra, 4), perplexity=ppl, kl=kl, top1=top1))
                print(json.dumps(rows[-1]), flush=True)
        rot.remove()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=f"cpu, {torch.get_num_threads()} threads",
                command="python " + " ".join(sys.argv), seconds=round(time.time() - t0), dense_perplexity=dense_ppl,
                model=Path(args.model).name, tokens=int(ev.numel()), cal_tokens=int(cal.numel()), bos=bos)
    write(Path(args.out), meta, rows, args)


def write(out: Path, meta: dict, rows: list, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rotations.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    cell = lambda r: f"{r['perplexity']:.2f} ({r['kl']:.3f}, {r['top1']:.3f})"  # noqa: E731
    lines = [f"# Rotated activations, TEAL's recipe, {meta['model']} ({meta['date']}, {meta['device']}, "
             f"{meta['seconds']} s)", "", f"`{meta['command']}`", "",
             f"wiki, {meta['tokens']} tokens, ctx {args.ctx}, every position sparsified; thresholds from "
             f"{meta['cal_tokens']} c4 tokens; dense perplexity {meta['dense_perplexity']:.2f}. Cells: perplexity "
             "(KL to dense, top-1 agreement). Budget: the fraction of projection bytes skipped; at equal bytes a "
             "rotation's own bytes raise its projections' sparsity (in brackets).", ""]
    budgets = sorted({r["budget"] for r in rows})
    lines += ["| rotation | " + " | ".join(f"{b:.0%}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for kind in dict.fromkeys(r["rotation"] for r in rows):
        for label in ("equal bytes", "same projection sparsity"):
            got = {r["budget"]: r for r in rows if r["rotation"] == kind and r["compare"] == label}
            if got:
                name = kind if label == "equal bytes" else f"{kind}, same projection sparsity (more bytes)"
                lines.append(f"| {name} | " + " | ".join(
                    cell(got[b]) + (f" [{got[b]['projection_sparsity']:.0%}]" if got[b]["rotation_bytes_fraction"]
                                    and label == "equal bytes" else "") for b in budgets) + " |")
    (out / "rotations.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
