"""Tuning: the largest budget whose plan stays within a perplexity bound of dense, on held-out text.

The question a user brings is "at the quality I accept, how much can decoding skip?". ``tune`` answers it by
bisection over the budget: each probe allocates (TEAL's greedy by default), calibrates on the calibration
windows and measures perplexity on held-out windows of the same text, never on the text the plan will be
judged on. Perplexity rises with the budget (measured on every model of reports/quality/), so the bisection
brackets the largest budget within (1 + within) x dense to ``tolerance``. Cost: one calibration and one
evaluation per probe, about log2((hi - lo) / tolerance) + 1 probes (7 for the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import Tensor
from tqdm import tqdm

from .allocation import AllocationConfig, plan_from_analysis
from .calibration import CalibrationConfig, calibrate
from .config import Config
from .errors import ActTailError
from .evaluation import evaluate_windows
from .plan import Plan


@dataclass(frozen=True)
class TuneConfig(Config):
    """How the budget is tuned; each field is an option of ``acttail tune``. within: the perplexity increase
    over dense allowed on held-out text (0.05: +5%); held_tokens: the held-out tokens, after the
    calibration's; tolerance: the width of the final bracket of budgets in [lo, hi]. Every probe is
    allocated with ``allocation`` and calibrated with ``calibration`` (its tokens and ctx included)."""

    within: float = 0.05
    held_tokens: int = 16384
    tolerance: float = 0.01
    lo: float = 0.05
    hi: float = 0.9
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    stage = "tune"

    def updated(self, **options) -> "TuneConfig":
        """A copy with some fields changed: its own, or those of its calibration or allocation config."""
        parts = {"calibration": {}, "allocation": {}}
        for name in list(options):
            for part in parts:
                if name in {f.name for f in fields(getattr(self, part))}:
                    parts[part][name] = options.pop(name)
        cfg = super().updated(**options)
        return replace(cfg, **{part: getattr(cfg, part).updated(**opts) for part, opts in parts.items()})


def tune(model, analysis, cal: Tensor, held: Tensor, config: TuneConfig | None = None, progress: bool = True,
         text: str = "tokens", **options) -> Plan:
    """The calibrated plan at the largest budget in [lo, hi] whose perplexity on ``held`` windows is at most
    (1 + within) x dense, found by bisection to ``tolerance``; its ``calibration["tune"]`` records the bound
    and every probe. ``options`` change fields of ``config`` (``TuneConfig``, or of its calibration and
    allocation configs: compensation, steps, method, ...); ``text`` names the calibration text in the plan.
    Raises when even ``lo`` is over the bound."""
    cfg = (config or TuneConfig()).updated(**options)
    within, lo, hi, tolerance = cfg.within, cfg.lo, cfg.hi, cfg.tolerance
    if not within > 0 or not 0 < lo < hi < 1 or not tolerance > 0:
        raise ActTailError(f"tune needs within > 0, 0 < lo < hi < 1 and tolerance > 0 (got within {within}, "
                           f"lo {lo}, hi {hi}, tolerance {tolerance})")
    dense = evaluate_windows(model, held, progress=False)["perplexity"]
    limit = dense * (1.0 + within)
    probes, best = [], None
    bar = tqdm(desc="tune", unit="probe", disable=not progress)

    def probe(budget: float) -> tuple[Plan, bool]:
        plan = plan_from_analysis(analysis, budget, cfg.allocation)
        plan = calibrate(model, plan, cal, cfg.calibration, progress=False, text=text)
        ppl = evaluate_windows(model, held, plan, progress=False, compare=False)["perplexity"]
        probes.append({"budget": budget, "perplexity": ppl, "within": ppl <= limit})
        bar.update()
        bar.set_postfix(budget=f"{budget:.3f}", ppl=f"{ppl:.3f}", limit=f"{limit:.3f}")
        return plan, ppl <= limit

    try:
        low, high = lo, hi
        while high - low > tolerance:
            mid = 0.5 * (low + high)
            plan, ok = probe(mid)
            low, high, best = (mid, high, plan) if ok else (low, mid, best)
        if best is None:
            best, ok = probe(lo)
            if not ok:
                raise ActTailError(f"even a budget of {lo} raises held-out perplexity above {limit:.3f} "
                                   f"(dense {dense:.3f} + {within:.0%}): nothing to tune")
    finally:
        bar.close()
    best.calibration["tune"] = {"within": within, "dense_perplexity": dense, "limit": limit, "lo": lo, "hi": hi,
                                "tolerance": tolerance, "held_tokens": int(held.numel()), "probes": probes}
    return best
