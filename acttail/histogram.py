"""A streaming log-histogram of |x|: the statistic thresholds are read from (calibration, TEAL's greedy).

2^16 bins over ln|x| in [-28, 10] (relative bin width 0.06%), filled batch by batch: memory is fixed
whatever the number of tokens, and a quantile is off by at most one bin's mass. Its own module because two
stages read thresholds from it: the greedy allocation (before calibration) and calibration itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BINS, LO, HI = 1 << 16, -28.0, 10.0  # ln|x| range of the histogram (|x| from 7e-13 to 2.2e4)


class LogHistogram:
    """Streaming histogram of ln|x| (fixed bins): counts, and thresholds at given quantiles."""

    def __init__(self):
        self.counts = torch.zeros(BINS, dtype=torch.float64)
        self.n = 0

    def add(self, x: Tensor) -> None:
        logs = x.detach().abs().float().clamp_(math.exp(LO), math.exp(HI) * 0.999).log_()
        self.counts += torch.histc(logs, bins=BINS, min=LO, max=HI).double().cpu()
        self.n += x.numel()

    def threshold(self, sparsity: float) -> float:
        """t with fraction(|x| <= t) ~= sparsity (linear in ln|x| inside the bin that crosses it)."""
        if sparsity <= 0.0:
            return 0.0
        target = sparsity * self.n
        cum = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).clamp(max=BINS - 1))
        below = float(cum[i - 1]) if i > 0 else 0.0
        frac = (target - below) / max(float(self.counts[i]), 1.0)
        width = (HI - LO) / BINS
        return math.exp(LO + (i + min(max(frac, 0.0), 1.0)) * width)
