"""The discovery steps that span partitions: where products live, the train/calibration split,
fitting the detector and calibrator, and scoring one partition.

Splits are assigned per spectrum from a hash of its TARGETID, so they are stable across reruns and
independent of how spectra are grouped into partitions: ``train`` spectra train the VAE and fit the
detectors, ``calibration`` spectra (used by neither) calibrate the conformal p-values, and every
spectrum (all splits) is scored. Anomalies in the calibration split make p-values conservative,
never anti-conservative.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from desi_anomaly.atomic import atomic_path
from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.io.partitions import parse_key
from desi_anomaly.ml.detectors import AnomalyEnsemble
from desi_anomaly.ml.significance import ConformalCalibrator

SPLITS = ("train", "calibration", "test")
#: Per-spectrum columns carried from the cleaned shard into the scores.
META_COLUMNS = (
    "TARGETID",
    "TARGET_RA",
    "TARGET_DEC",
    "Z",
    "ZERR",
    "DELTACHI2",
    "TILEID",
    "FIBER",
    "LASTNIGHT",
    "SNR_MEDIAN",
    "N_GOOD_PIXELS",
    "ALPHA_CONT",
    "EW_LYA",
    "FWHM_LYA",
    "EW_CIV",
    "FWHM_CIV",
    "EW_CIII",
    "FWHM_CIII",
    "EW_MGII",
    "FWHM_MGII",
    "EW_HBETA",
    "FWHM_HBETA",
    "BI_CIV",
    "BAL_FLAG",
)
SNR_EDGES = np.array([0.0, 1.0, 2.0, 4.0, 8.0, np.inf])
Z_EDGES = np.array([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, np.inf])


@dataclass(frozen=True)
class Layout:
    """Where every data product lives under one output root."""

    root: Path

    def cleaned(self, key: str) -> Path:
        return self.root / "cleaned" / f"{parse_key(key)}.parquet"

    def latents(self, key: str) -> Path:
        return self.root / "latents" / f"{parse_key(key)}.parquet"

    def scores(self, key: str) -> Path:
        return self.root / "scores" / f"{parse_key(key)}.parquet"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def detector(self) -> Path:
        return self.model_dir / "detector.joblib"

    @property
    def calibrator(self) -> Path:
        return self.model_dir / "calibrator.npz"


def assign_split(targetid: np.ndarray, train: float = 0.6, calibration: float = 0.2) -> np.ndarray:
    """'train', 'calibration' or 'test' for each TARGETID, from a fixed integer hash."""
    x = np.asarray(targetid, dtype=np.uint64).copy()
    # splitmix64 finaliser: well-mixed bits from consecutive TARGETIDs.
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(u < train, "train", np.where(u < train + calibration, "calibration", "test"))


def partition_inputs(layout: Layout, key: str) -> pd.DataFrame:
    """Latents joined with the shard's per-spectrum metadata for one partition, with SPLIT."""
    latents = pq.read_table(layout.latents(key)).to_pandas()
    shard_meta = pq.read_table(layout.cleaned(key)).drop_columns(["FLUX", "IVAR", "COVERAGE"])
    meta = shard_meta.to_pandas()
    meta = meta[[c for c in META_COLUMNS if c in meta]]
    table = latents.merge(meta, on="TARGETID", how="left", validate="one_to_one")
    if len(table) != len(latents) or table["Z"].isna().any():
        raise DesiAnomalyError(f"{layout.latents(key)}: latents do not match the cleaned shard")
    table["SPLIT"] = assign_split(table["TARGETID"].to_numpy())
    return table


def _stack(frames: list[pd.DataFrame], split: str) -> pd.DataFrame:
    parts = [f[f["SPLIT"] == split] for f in frames]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def fit_detector(
    layout: Layout,
    keys: list[str],
    *,
    seed: int = 0,
    max_train: int = 200_000,
    min_per_stratum: int = 200,
) -> tuple[AnomalyEnsemble, ConformalCalibrator]:
    """Fit the ensemble on train-split latents and calibrate on the calibration split; save both.

    Only the LATENT/RECON_RCHI2/SNR/Z columns of each partition are held, and the training sample
    is capped at ``max_train`` spectra.
    """
    frames = [partition_inputs(layout, k) for k in keys]
    train = _stack(frames, "train")
    calib = _stack(frames, "calibration")
    frames.clear()
    train = train[np.isfinite(train["RECON_RCHI2"])]
    if len(train) > max_train:
        train = train.sample(max_train, random_state=seed)
    if train.empty or calib.empty:
        raise DesiAnomalyError(
            f"{len(train)} training and {len(calib)} calibration spectra: need both to be non-empty"
        )
    ensemble = AnomalyEnsemble().fit(
        np.stack(train["LATENT"].to_numpy()), train["RECON_RCHI2"].to_numpy(), seed=seed
    )
    calib = calib[np.isfinite(calib["RECON_RCHI2"])]
    cal_scores = ensemble.score(
        np.stack(calib["LATENT"].to_numpy()), calib["RECON_RCHI2"].to_numpy()
    )["ANOMALY_SCORE"].to_numpy()
    calibrator = ConformalCalibrator().fit(
        cal_scores,
        calib["SNR_MEDIAN"].to_numpy(),
        calib["Z"].to_numpy(),
        snr_edges=SNR_EDGES,
        z_edges=Z_EDGES,
        min_per_stratum=min(min_per_stratum, len(calib)),
    )
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    ensemble.save(layout.detector)
    calibrator.save(layout.calibrator)
    return ensemble, calibrator


def score_partition(
    layout: Layout, key: str, ensemble: AnomalyEnsemble, calibrator: ConformalCalibrator
) -> Path:
    """Score one partition: ANOMALY_SCORE, its components and conformal P_VALUE; written atomically.

    Spectra whose reconstruction chi2 is undefined (no good pixels) get NaN scores and P_VALUE 1.
    """
    table = partition_inputs(layout, key)
    ok = np.isfinite(table["RECON_RCHI2"].to_numpy())
    scores = ensemble.score(
        np.stack(table.loc[ok, "LATENT"].to_numpy()).reshape(int(ok.sum()), -1),
        table.loc[ok, "RECON_RCHI2"].to_numpy(),
    )
    out = table.drop(columns=["LATENT"])
    for col in scores.columns:
        out[col] = np.nan
        out.loc[ok, col] = scores[col].to_numpy()
    out["P_VALUE"] = 1.0
    out.loc[ok, "P_VALUE"] = calibrator.pvalues(
        scores["ANOMALY_SCORE"].to_numpy(),
        out.loc[ok, "SNR_MEDIAN"].to_numpy(),
        out.loc[ok, "Z"].to_numpy(),
    )
    path = layout.scores(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out.to_parquet(tmp, index=False)
    return path
