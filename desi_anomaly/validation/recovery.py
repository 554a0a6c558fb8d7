"""Injection-recovery: fit the detectors on normal spectra, inject anomalies, re-score, calibrate.

1. ``fit_detectors``: the VAE latents and residual statistics of normal *train* spectra fit the
   ``AnomalyEnsemble`` (tail probabilities against normal *reference* spectra the VAE did not
   train on) and the ``PCABaseline``; both are calibrated with a ``ConformalCalibrator``
   (S/N x z strata, ``discovery.SNR_EDGES``/``Z_EDGES``/``Z_ISOLATED``) on normal *calibration*
   spectra (never used for fitting).
2. ``inject_and_score``: for a batch of observed normal *test* spectra, the originals and one
   injected copy per applicable class are preprocessed, encoded and scored by both methods, with
   conformal p-values.
3. ``add_qvalues``: Benjamini-Hochberg q-values per class, over the normal test spectra plus the
   injected spectra of that class (each class is its own catalogue); normal spectra get the q of
   the all-normal catalogue, so their rate of q < alpha is the realised false-discovery rate on
   null data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from desi_anomaly.discovery import SNR_EDGES, Z_EDGES, Z_ISOLATED
from desi_anomaly.ml.detectors import AnomalyEnsemble, stats_matrix
from desi_anomaly.ml.encoding import encode_shard
from desi_anomaly.ml.residuals import RESIDUAL_COLUMNS
from desi_anomaly.ml.significance import ConformalCalibrator, benjamini_hochberg
from desi_anomaly.ml.training import TrainedVAE
from desi_anomaly.preprocess import CleanedSpectra, PreprocessConfig, RestFrameGrid, preprocess
from desi_anomaly.shards import Shard
from desi_anomaly.spectra import ObservedSpectra

from .baseline import PCABaseline
from .injection import NO_ANOMALY, InjectionError, check_kinds, inject_spectra, with_labels

#: Score, p-value and q-value columns of the two methods.
METHODS = {
    "ensemble": ("ANOMALY_SCORE", "P_VALUE", "Q_VALUE"),
    "pca": ("PCA_RCHI2", "PCA_P_VALUE", "PCA_Q_VALUE"),
}
_META = ("TARGETID", "Z", "SNR_MEDIAN", "SOURCE_ROW", "ANOMALY", "ANOMALY_PARAMS")


@dataclass
class Detectors:
    """The fitted and calibrated methods compared by injection-recovery."""

    vae: TrainedVAE
    ensemble: AnomalyEnsemble
    calibrator: ConformalCalibrator
    pca: PCABaseline
    pca_calibrator: ConformalCalibrator
    #: the calibration spectra scored as by ``score_cleaned`` (what the calibrators were fitted on)
    calibration: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class ScoredSpectra:
    """Per-spectrum scores (``table``) and VAE latents (``latents``, same row order)."""

    table: pd.DataFrame
    latents: np.ndarray
    n_dropped: dict[str, int] = field(default_factory=dict)  # class -> dropped by preprocessing

    @classmethod
    def concat(cls, parts: list[ScoredSpectra]) -> ScoredSpectra:
        """Rows of several results, in order; dropped counts summed."""
        dropped: dict[str, int] = {}
        for p in parts:
            for k, v in p.n_dropped.items():
                dropped[k] = dropped.get(k, 0) + v
        return cls(
            pd.concat([p.table for p in parts], ignore_index=True),
            np.concatenate([p.latents for p in parts]),
            dropped,
        )


def concat_cleaned(parts: list[CleanedSpectra]) -> CleanedSpectra:
    """Cleaned spectra of several batches on one grid, stacked in order."""
    if not parts:
        raise InjectionError("no cleaned spectra to stack")
    grid = parts[0].grid
    if any(p.grid != grid for p in parts):
        raise InjectionError("cleaned spectra are on different rest-frame grids")
    return CleanedSpectra(
        grid,
        np.concatenate([p.flux for p in parts]),
        np.concatenate([p.ivar for p in parts]),
        np.concatenate([p.coverage for p in parts]),
        pd.concat([p.meta for p in parts], ignore_index=True),
        pd.concat([p.dropped for p in parts], ignore_index=True),
    )


def as_shard(cleaned: CleanedSpectra, partition: str = "injection") -> Shard:
    """An in-memory shard of cleaned spectra, for ``encode_shard``."""
    info = {"grid": cleaned.grid.to_dict(), "partition": partition}
    return Shard(cleaned.flux, cleaned.ivar, cleaned.coverage, cleaned.meta, info)


def encode(vae: TrainedVAE, cleaned: CleanedSpectra) -> tuple[np.ndarray, np.ndarray]:
    """VAE codes (n, d) and the ensemble's ``stats`` (residual statistics, NaN for spectra without
    good pixels, then the line EWs of the cleaning step) of cleaned spectra."""
    table = encode_shard(vae, as_shard(cleaned))
    dim = vae.config.code_dim
    latents = table.column("LATENT").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    resid = table.select(list(RESIDUAL_COLUMNS)).to_pandas()
    return latents, stats_matrix(pd.concat([resid, cleaned.meta.reset_index(drop=True)], axis=1))


def fit_detectors(
    vae: TrainedVAE,
    train: CleanedSpectra,
    reference: CleanedSpectra,
    calibration: CleanedSpectra,
    *,
    seed: int = 0,
    pca_components: int = 10,
    min_per_stratum: int = 200,
) -> Detectors:
    """Fit the ensemble (tail probabilities against ``reference``) and the PCA baseline on
    ``train`` and calibrate both on ``calibration``."""
    ensemble = AnomalyEnsemble().fit(
        *_ensemble_inputs(vae, train), seed=seed, reference=_ensemble_inputs(vae, reference)
    )
    pca = PCABaseline(pca_components, seed=seed).fit(train.flux, train.ivar)
    cal = _scores(vae, ensemble, pca, calibration).table
    snr, z = cal["SNR_MEDIAN"].to_numpy(), cal["Z"].to_numpy()
    fitted = [
        ConformalCalibrator().fit(
            cal[col].to_numpy(),
            snr,
            z,
            snr_edges=SNR_EDGES,
            z_edges=Z_EDGES,
            min_per_stratum=min(min_per_stratum, len(cal)),
            z_isolated=Z_ISOLATED,
        )
        for col in ("ANOMALY_SCORE", "PCA_RCHI2")
    ]
    det = Detectors(vae, ensemble, fitted[0], pca, fitted[1], calibration=cal)
    _add_pvalues(det, cal)
    return det


def _ensemble_inputs(
    vae: TrainedVAE, cleaned: CleanedSpectra
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latents, stats, S/N) of the cleaned spectra that have good pixels."""
    latents, stats = encode(vae, cleaned)
    ok = np.isfinite(stats[:, 0])
    return latents[ok], stats[ok], cleaned.meta["SNR_MEDIAN"].to_numpy()[ok]


def _scores(
    vae: TrainedVAE, ensemble: AnomalyEnsemble, pca: PCABaseline, cleaned: CleanedSpectra
) -> ScoredSpectra:
    """Ensemble scores (ANOMALY_SCORE and its component columns) and PCA_RCHI2 of cleaned spectra
    (rows without any good pixel are left out), before calibration."""
    latents, resid = encode(vae, cleaned)
    ok = np.isfinite(resid[:, 0])
    meta = cleaned.meta.loc[ok, [c for c in _META if c in cleaned.meta]].reset_index(drop=True)
    table = meta.assign(**{c: resid[ok, i] for i, c in enumerate(RESIDUAL_COLUMNS)})
    if ok.any():
        scores = ensemble.score(latents[ok], resid[ok], table["SNR_MEDIAN"].to_numpy())
        for col in scores.columns:  # ANOMALY_SCORE and its components
            table[col] = scores[col].to_numpy()
        table["PCA_RCHI2"] = pca.score(cleaned.flux[ok], cleaned.ivar[ok])
    else:
        table["ANOMALY_SCORE"] = table["PCA_RCHI2"] = np.zeros(0)
    return ScoredSpectra(table, latents[ok])


def _add_pvalues(det: Detectors, table: pd.DataFrame) -> None:
    """Conformal P_VALUE (after ANOMALY_SCORE's columns) and PCA_P_VALUE, in place."""
    snr, z = table["SNR_MEDIAN"].to_numpy(), table["Z"].to_numpy()
    p = det.calibrator.pvalues(table["ANOMALY_SCORE"].to_numpy(), snr, z)
    table.insert(table.columns.get_loc("PCA_RCHI2"), "P_VALUE", p)
    table["PCA_P_VALUE"] = det.pca_calibrator.pvalues(table["PCA_RCHI2"].to_numpy(), snr, z)


def score_cleaned(det: Detectors, cleaned: CleanedSpectra) -> ScoredSpectra:
    """Ensemble scores (ANOMALY_SCORE and its component columns) and PCA_RCHI2 with conformal
    p-values of cleaned spectra (rows without any good pixel are left out)."""
    out = _scores(det.vae, det.ensemble, det.pca, cleaned)
    _add_pvalues(det, out.table)
    return out


def inject_and_score(
    det: Detectors,
    spectra: ObservedSpectra,
    kinds: tuple[str, ...] | list[str],
    rng: np.random.Generator,
    *,
    config: PreprocessConfig | None = None,
    batch: str = "0",
) -> ScoredSpectra:
    """Score the normal ``spectra`` and one injected copy per applicable class of each.

    Injection acts on the observed flux (``injection.inject_spectra``) before ``preprocess``.
    Rows get BATCH (``batch``), SOURCE_ROW (the original's row in ``spectra``) and, for binning,
    SNR_BIN_VALUE and Z_BIN_VALUE: the S/N and Z of the cleaned original. Injected copies whose
    original was dropped by preprocessing are left out; injected copies dropped by preprocessing
    themselves are counted in ``n_dropped``.
    """
    kinds = check_kinds(kinds)
    config = config or PreprocessConfig(grid=RestFrameGrid.from_dict(det.vae.grid))
    labelled = with_labels(spectra)
    originals = preprocess(labelled, config)
    kept = originals.meta.set_index("SOURCE_ROW")
    cleaned, dropped = [originals], {}
    for kind in kinds:
        injected = inject_spectra(labelled, kind, rng)
        clean = preprocess(injected, config)
        keep = np.isin(clean.meta["SOURCE_ROW"], kept.index)
        n_src = int(np.isin(injected.meta["SOURCE_ROW"], kept.index).sum())
        dropped[kind] = n_src - int(keep.sum())
        if not keep.all():
            meta = clean.meta[keep].reset_index(drop=True)
            clean = CleanedSpectra(clean.grid, clean.flux[keep], clean.ivar[keep],
                                   clean.coverage[keep], meta)  # fmt: skip
        cleaned.append(clean)
    # one encoding call for all of them: the VAE runs fastest on full, equal-sized batches
    out = score_cleaned(det, concat_cleaned(cleaned))
    out.n_dropped = dropped
    src = out.table["SOURCE_ROW"].to_numpy()
    out.table["SNR_BIN_VALUE"] = kept.loc[src, "SNR_MEDIAN"].to_numpy()
    out.table["Z_BIN_VALUE"] = kept.loc[src, "Z"].to_numpy()
    out.table.insert(0, "BATCH", batch)
    return out


def add_qvalues(table: pd.DataFrame, alpha: float = 0.01) -> pd.DataFrame:
    """Per-class BH q-values of both methods (scheme in the module doc), as Q_VALUE/PCA_Q_VALUE."""
    if "ANOMALY" not in table:
        raise InjectionError("scored table has no ANOMALY column")
    out = table.copy()
    normal = out["ANOMALY"].to_numpy() == NO_ANOMALY
    for _, p_col, q_col in METHODS.values():
        p = out[p_col].to_numpy(dtype=np.float64)
        q = np.ones(len(out))
        q[normal] = benjamini_hochberg(p[normal], alpha).qvalues
        for kind in pd.unique(out.loc[~normal, "ANOMALY"]):
            rows = out["ANOMALY"].to_numpy() == kind
            both = np.flatnonzero(rows | normal)
            q_both = benjamini_hochberg(p[both], alpha).qvalues
            q[both[rows[both]]] = q_both[rows[both]]
        out[q_col] = q
    return out
