"""Exporters: a plan in the formats other runtimes read. Each says what its consumer keeps and drops, as
measured by running the consumer on our files (tests/test_export.py; reports/export/teal.md).

- ``gemma3n``: ``{"activation_sparsity_pattern": [one float per layer]}``, the field of Gemma-3n's
  config.json read by HF transformers, vLLM, SGLang and MLX. transformers' Gemma3nForCausalLM keeps one
  number per layer (the parameter-weighted mean of the layer's projections; ``mlp.activation_sparsity``)
  and applies it at one place only, the MLP gate-projection output: per token it cuts the signed values
  (not |x|) at the Gaussian quantile mean + std * Phi^-1(sparsity) and passes relu(x - cutoff) on, so
  about that fraction reaches the activation function as 0 and the rest is shifted by the cutoff. Drops:
  the per-projection ratios (q/k/v/o/up/down inputs stay dense), our thresholds and calibration data.
- ``nncf``: OpenVINO NNCF's ``target_sparsity_by_scope`` as JSON, module-name regex -> sparsity, one
  entry per projection; build ``{TargetScope(patterns=[k]): v for k, v in ...items()}`` for
  ``nncf.experimental.torch.sparsify_activations.sparsify_activations``. NNCF keeps every projection's
  sparsity: one ActivationsSparsifier before each named linear, nowhere else. Drops: our thresholds and
  calibration statistics; it recalibrates one scalar threshold per projection (a moving average of
  per-batch quantiles of |x|) on its own dataset and zeroes |x| <= threshold on every token, so the
  achieved sparsity follows its dataset. The patterns follow the node names of NNCF 3.4.0's torch tracing
  of HF Llama-style models (``model/self_attn/q_proj/linear/<layer>``, where the trailing number is the
  call index, i.e. the layer); other NNCF versions may name nodes differently, and NNCF reports a
  pattern it cannot match.
- ``teal``: TEAL's greedy lookup folder, ``layer-<i>/results.csv`` with the columns
  ``Effective Sparsity,Activation Error,Baseline Error,q,k,v,o,gate,up,down``, one row per layer (the
  errors are left empty: we did not measure them). Read by TEAL's HF model (``load_greedy_sparsities``,
  ``ppl_test.py --greedy_flag``); its gpt-fast loader reads no lookup, only histograms and one uniform
  sparsity. TEAL picks the row nearest the level it is asked for (by Effective Sparsity, our parameter-
  weighted mean, as its own) and keeps each projection's sparsity exactly; with one row per layer every
  level gets this plan's row. Drops: the thresholds (TEAL recomputes them from its own activation
  histograms as the (1 + sparsity) / 2 quantile of the signed inputs, i.e. assuming them symmetric about
  0), the calibration statistics and the search ladder; it sparsifies decode tokens and the last half of
  each prefill.

None of the three formats has a place for a score other than |x| or for compensation (biases, low-rank
factors): ``losses`` names what an export drops, and the command line prints it.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path

from .errors import ActTailError
from .outputs import replace_folder, write_file, write_json, writing
from .layout import HF_MODULES, KINDS
from .plan import Plan, PlanEntry, weighted_sparsity

# NNCF's torch node names join module names with '/', not '.'.
HF_NAMES = {kind: name.replace(".", "/") for kind, name in HF_MODULES.items()}
TEAL_COLUMNS = ["Effective Sparsity", "Activation Error", "Baseline Error", *KINDS]


def layer_entries(plan: Plan) -> dict[int, list[PlanEntry]]:
    """Plan entries grouped by layer, every layer of the model present."""
    by_layer = {i: [] for i in range(plan.model["num_layers"])}
    for e in plan.projections:
        by_layer[e.layer].append(e)
    empty = [i for i, es in by_layer.items() if not es]
    if empty:
        raise ActTailError(f"plan has no projections for layer(s) {', '.join(map(str, empty[:5]))}")
    return by_layer


def gemma3n_pattern(plan: Plan) -> list[float]:
    """One sparsity per layer: the parameter-weighted mean of the layer's projections."""
    return [weighted_sparsity(es) for _, es in sorted(layer_entries(plan).items())]


def nncf_scopes(plan: Plan) -> dict[str, float]:
    """Module-name regex -> sparsity, one per projection (NNCF matches with re.match, so we anchor at $)."""
    return {f".*/{HF_NAMES[e.kind]}/linear/{e.layer}$": e.sparsity for e in plan.projections}


def teal_tables(plan: Plan) -> dict[int, str]:
    """Layer -> text of its TEAL ``results.csv`` (one row: this plan's sparsities)."""
    tables = {}
    for layer, es in sorted(layer_entries(plan).items()):
        by_kind = {e.kind: e.sparsity for e in es}
        missing = [k for k in KINDS if k not in by_kind]
        if missing:
            raise ActTailError(f"TEAL needs all of {','.join(KINDS)}; layer {layer} lacks {','.join(missing)}")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(TEAL_COLUMNS)
        writer.writerow([repr(weighted_sparsity(es)), "", "", *(repr(by_kind[k]) for k in KINDS)])
        tables[layer] = buf.getvalue()
    return tables


def write_gemma3n(plan: Plan, out: str | Path) -> list[Path]:
    write_json(out, {"activation_sparsity_pattern": gemma3n_pattern(plan)})
    return [Path(out)]


def write_nncf(plan: Plan, out: str | Path) -> list[Path]:
    write_json(out, nncf_scopes(plan))
    return [Path(out)]


def write_teal(plan: Plan, out: str | Path) -> list[Path]:
    """Write the folder beside ``out`` under a temporary name, then rename it into place."""
    out = Path(out)
    tables = teal_tables(plan)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ActTailError(f"output folder does not exist: {parent}")
    if out.exists() and not _is_teal_folder(out):
        raise ActTailError(f"{out} exists and is not a TEAL lookup folder; choose another output path")
    with writing(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        with writing(out):
            for layer, text in tables.items():
                (tmp / f"layer-{layer}").mkdir()
                write_file(tmp / f"layer-{layer}" / "results.csv", text)
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [out / f"layer-{layer}" / "results.csv" for layer in tables]


def _is_teal_folder(path: Path) -> bool:
    """A folder holding only layer-<i>/results.csv (so replacing it cannot delete anything else)."""
    if not path.is_dir():
        return False
    for child in path.iterdir():
        if not (child.is_dir() and child.name.startswith("layer-")):
            return False
        if any(f.name != "results.csv" for f in child.iterdir()):
            return False
    return True


EXPORTERS = {"gemma3n": write_gemma3n, "nncf": write_nncf, "teal": write_teal}


def losses(plan: Plan, fmt: str) -> list[str]:
    """What of this plan the format cannot express (beyond what every export of that format loses)."""
    out = []
    if plan.score != "magnitude":
        out.append(f"the {plan.score} score (per-channel score weights): {fmt} ranks inputs by |x| only")
    if plan.compensation != "none":
        out.append(f"the {plan.compensation} compensation ({len(plan.tensors)} tensors): {fmt} has no place for it, "
                   "so the exported sparsities will cost more quality than this plan does")
    return out


def export(plan: Plan, fmt: str, out: str | Path) -> list[Path]:
    """Write ``plan`` as ``fmt`` to ``out`` (a JSON file, or a folder for teal); return the files written."""
    if fmt not in EXPORTERS:
        raise ActTailError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORTERS)})")
    if plan.model.get("rotation"):
        raise ActTailError(f"the plan is for a rotated checkpoint (acttail rotate): {fmt} runs the model's own "
                           "layers, without the basis changes between them, so the thresholds would act on the "
                           "wrong basis")
    return EXPORTERS[fmt](plan, out)
