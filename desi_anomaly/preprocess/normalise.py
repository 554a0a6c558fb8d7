"""Robust per-spectrum normalisation."""

from __future__ import annotations

import numpy as np


def masked_median(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Row-wise median of ``values`` (n, m) over the entries where ``good``; NaN for empty rows.

    Bad entries are set to +inf so they sort last. When every row has about the same number of good
    entries, two partitions isolate the few order statistics needed; otherwise rows are sorted.
    """
    n, m = values.shape
    x = np.where(good, values, np.inf)
    count = np.count_nonzero(good, axis=1)
    has = count > 0
    lo, hi = np.maximum((count - 1) // 2, 0), count // 2
    if not has.any():
        return np.full(n, np.nan)
    first, last = int(lo[has].min()), int(hi[has].max())
    span = last - first + 1
    if span < m // 8:  # in place: x is a fresh array
        if first > 0:
            x.partition(first, axis=1)
            x = x[:, first:]
        if span < x.shape[1]:
            x.partition(span - 1, axis=1)
            x = x[:, :span]
    else:
        first = 0
    x.sort(axis=1)
    rows = np.arange(n)
    lo_val = x[rows, np.clip(lo - first, 0, x.shape[1] - 1)].astype(np.float64)
    med = 0.5 * (lo_val + x[rows, np.clip(hi - first, 0, x.shape[1] - 1)])
    med[~has] = np.nan
    return med


def median_norm(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Per-spectrum norm: median flux over the pixels with data (ivar > 0); NaN when none.

    Only the span of columns holding data in each row is searched (rest-frame spectra cover about
    a third of the grid).
    """
    has = ivar > 0
    n, m = has.shape
    if n == 0 or m == 0:
        return np.full(n, np.nan)
    first = has.argmax(axis=1)
    last = m - 1 - has[:, ::-1].argmax(axis=1)
    width = int(max((last - first).max() + 1, 1))
    cols = np.minimum(first, m - width)[:, None] + np.arange(width)
    return masked_median(
        np.take_along_axis(flux, cols, axis=1), np.take_along_axis(has, cols, axis=1)
    )


def normalise_in_place(
    flux: np.ndarray, ivar: np.ndarray, norm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``flux /= norm`` and ``ivar *= norm^2`` row by row, in place; returns (flux, ivar)."""
    norm = np.asarray(norm, dtype=flux.dtype)[:, None]
    flux /= norm
    ivar *= norm * norm
    return flux, ivar
