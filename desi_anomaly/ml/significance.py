"""Significance of anomaly scores: split-conformal p-values in S/N x redshift strata, BH q-values.

The calibration set is a held-out sample of spectra assumed normal, scored by the same fitted
detector but used neither to train the VAE nor to fit the detector. A spectrum with score s in
stratum k gets ``p = (1 + #{calibration scores in k >= s}) / (n_k + 1)``, which is uniform (up to
ties, conservative) for a normal spectrum exchangeable with the calibration spectra of its stratum.
Calibrating within S/N x z strata keeps p-values valid when the score of normal spectra depends on
S/N or redshift.

Strata: S/N and z are binned by ``snr_edges`` and ``z_edges`` (values outside the outer edges join
the outer bins). Bins with fewer than ``min_per_stratum`` calibration spectra are merged with
neighbours: first whole S/N bins, from low S/N upwards, are grouped until each group holds at
least ``min_per_stratum`` (a short group left at the high end joins the one below it); then, within
each S/N group, z bins are grouped the same way from low z upwards. Every stratum is thus a
rectangle of adjacent bins holding at least ``min_per_stratum`` calibration spectra. S/N comes
first because the extreme scores of normal spectra depend on it (noise spikes and poorly
constrained fits at low S/N, model misfits at high S/N), and pooled with them a spectrum of
another S/N would need to outscore those outliers.

``z_isolated = (z_low, z_high)`` (each one of the inner ``z_edges``, or None) cuts the redshift
range into parts that are never pooled: below ``z_low``, between, and from ``z_high`` up. Each
part is stratified as above on its own, however few calibration spectra it holds (a part with
fewer than ``min_per_stratum`` is one stratum). The two ends of the redshift range show
different spectra from the bulk and the model fits them worst: below z ~ 1 the rest-frame optical
(narrow Balmer and [O III] cores, host-galaxy light, no forest), above z ~ 5 a nearly opaque
forest in a rare population (DR1's 99th redshift percentile is 3.7). Pooled with the bulk, their
normal spectra set the stratum's extreme tail (a z ~ 3 spectrum with a damped Lyman-alpha system
would have to outscore bright z < 1 misfits) and are discovered themselves as anomalies of the
pooled stratum (docs/injection_recovery.md tabulates the calibration tail by S/N and redshift
bin). Kept apart, they are compared with each other; a small part gives coarse p-values (at
least ``1 / (n + 1)``; 1 when it holds no calibration spectrum), so the catalogue claims no
anomaly there that the calibration cannot support.

Resolution: p-values are at least ``1 / (n_k + 1)`` in a stratum of n_k calibration spectra, and BH
over m spectra at level alpha makes R discoveries only if they reach p <= alpha * R / m, so it makes
none unless R >= m / (alpha * (n_k + 1)). At m = 1.6M and alpha = 0.01, strata of 16k calibration
spectra are needed before 10k discoveries become possible: size ``min_per_stratum`` accordingly.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.stats import spearmanr
from statsmodels.stats.multitest import multipletests

from desi_anomaly import __version__
from desi_anomaly.atomic import atomic_path
from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.ml.detectors import AnomalyInputError, ModelFileError, check_finite_rows

FORMAT = "desi_anomaly.ConformalCalibrator"
FORMAT_VERSION = 1
_ARRAYS = ("snr_edges", "z_edges", "stratum_of", "sorted_scores", "offsets")


def _as_columns(*arrays: np.ndarray, names: str) -> list[np.ndarray]:
    cols = [np.asarray(a, dtype=np.float64) for a in arrays]
    if any(c.ndim != 1 or c.shape != cols[0].shape for c in cols):
        raise AnomalyInputError(
            f"{names} must be 1-D arrays of one length, got shapes {[c.shape for c in cols]}"
        )
    check_finite_rows(names, *cols)
    return cols


def _bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in ``[0, len(edges) - 2]``; values outside the edges join the outer bins."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def _group(counts: np.ndarray, minimum: int) -> np.ndarray:
    """Group consecutive bins until each group holds ``minimum``; a short tail joins the last."""
    labels = np.empty(len(counts), dtype=np.int64)
    group = total = 0
    for i, count in enumerate(counts):
        labels[i] = group
        total += count
        if total >= minimum:
            group, total = group + 1, 0
    if total < minimum and group > 0:
        labels[labels == group] = group - 1
    return labels


def _check_edges(name: str, edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise AnomalyInputError(f"{name} must be at least two strictly increasing values")
    return edges


class ConformalCalibrator:
    """Split-conformal p-values of anomaly scores within S/N x redshift strata."""

    def fit(
        self,
        cal_scores: np.ndarray,
        cal_snr: np.ndarray,
        cal_z: np.ndarray,
        *,
        snr_edges: np.ndarray,
        z_edges: np.ndarray,
        min_per_stratum: int = 500,
        z_isolated: tuple[float | None, float | None] = (None, None),
    ) -> ConformalCalibrator:
        """Calibrate on scores, median S/N and redshifts of held-out normal spectra."""
        scores, snr, z = _as_columns(cal_scores, cal_snr, cal_z, names="calibration score/S/N/Z")
        if min_per_stratum < 1 or scores.size < min_per_stratum:
            raise AnomalyInputError(
                f"{scores.size} calibration spectra with min_per_stratum={min_per_stratum}: "
                "need min_per_stratum >= 1 and at least that many spectra"
            )
        self.snr_edges = _check_edges("snr_edges", snr_edges)
        self.z_edges = _check_edges("z_edges", z_edges)
        snr_bin, z_bin = _bin(snr, self.snr_edges), _bin(z, self.z_edges)
        counts = np.zeros((len(self.snr_edges) - 1, len(self.z_edges) - 1), dtype=np.int64)
        np.add.at(counts, (snr_bin, z_bin), 1)

        cuts = [self._isolated_bin(edge) for edge in z_isolated]
        bounds = [0, *(c for c in cuts if c is not None), counts.shape[1]]
        if np.any(np.diff(bounds) <= 0):
            raise AnomalyInputError(f"z_isolated={z_isolated} must be increasing")
        self.stratum_of = np.empty_like(counts)  # (snr bin, z bin) -> stratum
        n_strata = 0
        for lo, hi in itertools.pairwise(bounds):  # redshift ranges that are never pooled
            part = counts[:, lo:hi]
            snr_groups = _group(part.sum(axis=1), min_per_stratum)
            for g in range(snr_groups.max() + 1):
                rows = snr_groups == g
                z_groups = _group(part[rows].sum(axis=0), min_per_stratum)
                self.stratum_of[rows, lo:hi] = (n_strata + z_groups)[None, :]
                n_strata += z_groups.max() + 1

        stratum = self.stratum_of[snr_bin, z_bin]
        order = np.lexsort((scores, stratum))
        self.sorted_scores = scores[order]  # by stratum, then score
        self.offsets = np.searchsorted(stratum[order], np.arange(n_strata + 1))
        self.min_per_stratum = int(min_per_stratum)
        self.z_isolated = tuple(z_isolated)
        return self

    def _isolated_bin(self, edge: float | None) -> int | None:
        """Index of the z bin starting at ``edge`` (an inner z edge), None for None."""
        if edge is None:
            return None
        inner = self.z_edges[1:-1]
        if not np.any(inner == edge):
            raise AnomalyInputError(
                f"z_isolated edge {edge} must be one of the inner z_edges {inner.tolist()}"
            )
        return int(np.flatnonzero(self.z_edges == edge)[0])

    @property
    def n_per_stratum(self) -> np.ndarray:
        """Number of calibration spectra in each stratum."""
        return np.diff(self.offsets)

    def stratum(self, snr: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Stratum index of spectra with median S/N ``snr`` and redshift ``z``."""
        return self._lookup(*_as_columns(snr, z, names="S/N/Z"))

    def _lookup(self, snr: np.ndarray, z: np.ndarray) -> np.ndarray:
        if not hasattr(self, "stratum_of"):
            raise DesiAnomalyError("ConformalCalibrator used before fit or load")
        return self.stratum_of[_bin(snr, self.snr_edges), _bin(z, self.z_edges)]

    def pvalues(self, scores: np.ndarray, snr: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Conformal p-values ``(1 + #{cal >= s}) / (n_cal + 1)`` within each spectrum's stratum."""
        scores, snr, z = _as_columns(scores, snr, z, names="score/S/N/Z")
        stratum = self._lookup(snr, z)
        p = np.empty(scores.size, dtype=np.float64)
        for k in np.unique(stratum):
            rows = np.flatnonzero(stratum == k)
            cal = self.sorted_scores[self.offsets[k] : self.offsets[k + 1]]
            n_ge = cal.size - np.searchsorted(cal, scores[rows], side="left")
            p[rows] = (1.0 + n_ge) / (cal.size + 1.0)
        return p

    def save(self, path: str | Path) -> None:
        """Write the calibrator atomically as ``.npz`` (arrays plus a JSON ``info`` string)."""
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "min_per_stratum": self.min_per_stratum,
            "z_isolated": list(self.z_isolated),
            "n_calibration": int(self.sorted_scores.size),
            "desi_anomaly": __version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh, info=np.array(json.dumps(info)), **{key: getattr(self, key) for key in _ARRAYS}
            )

    @classmethod
    def load(cls, path: str | Path) -> ConformalCalibrator:
        """Read a calibrator written by ``save``."""
        if not Path(path).is_file():
            raise ModelFileError(path, "no such file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            info = json.loads(str(arrays.pop("info")))
        except Exception as exc:  # zip, npy-format and JSON errors for a damaged file
            raise ModelFileError(path, f"cannot be read as a calibrator .npz ({exc})") from exc
        if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                path, f"not a {FORMAT} file of format version {FORMAT_VERSION}: {info}"
            )
        missing = set(_ARRAYS) - set(arrays)
        if missing:
            raise ModelFileError(path, f"calibrator file lacks arrays {sorted(missing)}")
        cal = cls()
        for key in _ARRAYS:
            setattr(cal, key, arrays[key])
        cal.min_per_stratum = info["min_per_stratum"]
        cal.z_isolated = tuple(info.get("z_isolated", (None, None)))
        return cal


class BHResult(NamedTuple):
    """Benjamini-Hochberg q-values and the discoveries ``q < alpha``."""

    qvalues: np.ndarray
    discoveries: np.ndarray


def benjamini_hochberg(p: np.ndarray, alpha: float = 0.01) -> BHResult:
    """Benjamini-Hochberg q-values across the whole catalogue (statsmodels ``fdr_bh``)."""
    (p,) = _as_columns(p, names="p-values")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise AnomalyInputError("p-values must lie in [0, 1]")
    if not p.size:
        return BHResult(p, np.zeros(0, dtype=bool))
    _, q, _, _ = multipletests(p, alpha=alpha, method="fdr_bh")
    return BHResult(q, q < alpha)


def snr_dependence(score: np.ndarray, snr: np.ndarray) -> float:
    """Spearman rank correlation of a score with S/N (near 0 when the score does not track S/N)."""
    score, snr = _as_columns(score, snr, names="score/S/N")
    return float(spearmanr(score, snr).statistic)
