"""Per-spectrum train / reference / calibration / test split, from a hash of TARGETID.

The split is stable across reruns and independent of how spectra are grouped into partitions:
``train`` spectra train the VAE and fit the detectors, ``reference`` spectra (not seen by the VAE)
set the detectors' tail probabilities, ``calibration`` spectra (used by none of these) calibrate
the conformal p-values, and every spectrum (all splits) is scored.

The calibration share is large on purpose: conformal p-values are at least ``1 / (n_cal + 1)``, so
Benjamini-Hochberg at level alpha over all spectra can only make discoveries when there are at
least ``1 / (alpha * calibration)`` of them (250 at alpha = 0.01). Training needs far fewer
spectra than a release holds (it is capped by ``max_spectra``).
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "reference", "calibration", "test")


def assign_split(
    targetid: np.ndarray, train: float = 0.4, reference: float = 0.1, calibration: float = 0.4
) -> np.ndarray:
    """'train', 'reference', 'calibration' or 'test' for each TARGETID (those shares, in that
    order, of a fixed integer hash's range)."""
    x = np.asarray(targetid, dtype=np.uint64).copy()
    # splitmix64 finaliser: well-mixed bits from consecutive TARGETIDs.
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum([train, reference, calibration])
    return np.asarray(SPLITS)[np.searchsorted(edges, u, side="right")]
