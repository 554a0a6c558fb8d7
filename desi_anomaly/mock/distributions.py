"""DR1 QSO population statistics and inverse-CDF sampling through quantile knots."""

from __future__ import annotations

import numpy as np

#: DR1 QSO redshift quantiles (measured), extended by two tail knots so that z > 4.6 stays rare.
DR1_Z_QUANTILES: tuple[tuple[float, float], ...] = (
    (0.0, 0.05), (0.01, 0.38), (0.05, 0.69), (0.25, 1.24), (0.50, 1.71), (0.75, 2.21),
    (0.95, 2.99), (0.99, 3.66), (0.999, 4.6), (0.99999, 5.8), (1.0, 6.8),
)  # fmt: skip

#: DR1 median per-pixel S/N quantiles (measured), with tail knots; interpolated in log S/N.
DR1_SNR_QUANTILES: tuple[tuple[float, float], ...] = (
    (0.0, 0.05), (0.001, 0.12), (0.01, 0.31), (0.25, 1.2), (0.50, 2.3), (0.75, 4.7),
    (0.95, 12.4), (0.99, 23.0), (0.999, 45.0), (1.0, 80.0),
)  # fmt: skip

#: DR1 quantiles of the masked pixel fraction (median 0.4 %, 95 %: 1 %, max ~21 %).
DR1_MASKED_FRACTION = {"median": 0.004, "p95": 0.01, "max": 0.21}


def quantile_function(
    knots: tuple[tuple[float, float], ...], p: np.ndarray, log: bool = False
) -> np.ndarray:
    """Piecewise-linear inverse CDF through ``(probability, value)`` knots (log value if asked)."""
    probs, values = (np.asarray(v, dtype=np.float64) for v in zip(*knots, strict=True))
    if log:
        return np.exp(np.interp(p, probs, np.log(values)))
    return np.interp(p, probs, values)


def sample_redshift(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` QSO redshifts following the DR1 quantiles."""
    return quantile_function(DR1_Z_QUANTILES, rng.random(n))


def sample_snr(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` target median per-pixel S/N values following the DR1 quantiles."""
    return quantile_function(DR1_SNR_QUANTILES, rng.random(n), log=True)


def sample_masked_fraction(n: int, rng: np.random.Generator) -> np.ndarray:
    """Fraction of bad (masked, zero-ivar) pixels per spectrum: log-normal body plus a rare tail."""
    sigma = np.log(DR1_MASKED_FRACTION["p95"] / DR1_MASKED_FRACTION["median"]) / 1.645
    frac = DR1_MASKED_FRACTION["median"] * np.exp(sigma * rng.standard_normal(n))
    tail = rng.random(n) < 0.003  # a dead amplifier or a bad fibre segment
    frac[tail] = rng.uniform(0.03, DR1_MASKED_FRACTION["max"], tail.sum())
    return np.minimum(frac, DR1_MASKED_FRACTION["max"])
