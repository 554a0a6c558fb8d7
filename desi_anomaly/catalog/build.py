"""The ranked anomaly catalog: significant spectra with type, follow-up priority and provenance.

A spectrum is catalogued when its Benjamini-Hochberg q-value is below ``alpha``. Rows are ranked
by q-value, then by decreasing anomaly score (then TARGETID, for a deterministic order), so RANK 1
is the most anomalous spectrum and Q_VALUE never decreases with RANK.

Follow-up priority (``FOLLOWUP_PRIORITY``):

- ``low``: TYPE is ``artefact/systematic`` (instrumental: sky residuals, arm seams, bad fibres).
- ``high``: not an artefact, not in the known-anomaly list (KNOWN_TYPE empty), and bright enough to
  confirm with a new spectrum: SNR_MEDIAN >= ``followup_snr`` (default 4, about the DR1 75th
  percentile).
- ``medium``: every other catalogued spectrum (already known, or too faint / S/N unknown).

Every catalogued spectrum is significant at ``alpha``; the rule only orders the follow-up effort.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.io.partitions import parse_key
from desi_anomaly.ml.anomaly_types import TYPE_ARTEFACT, TYPE_NAMES
from desi_anomaly.ml.residuals import RESIDUAL_COLUMNS
from desi_anomaly.preprocess.features import BROAD_LINES

#: Anomaly types named by the clustering step; ``TYPE_ARTEFACT`` is instrumental.
ANOMALY_TYPES = TYPE_NAMES
PRIORITIES = ("high", "medium", "low")
DEFAULT_ALPHA = 0.01
DEFAULT_FOLLOWUP_SNR = 4.0
#: CLUSTER of spectra that HDBSCAN left unclustered (or that have no cluster assignment).
NOISE_CLUSTER = -1

#: Columns the scores table must have (one row per scored spectrum).
SCORES_REQUIRED = ("TARGETID", "PARTITION", "ANOMALY_SCORE", "P_VALUE", "Q_VALUE")
#: Columns of the scores outputs besides SCORES_REQUIRED, kept when the scores have them.
SCORES_OPTIONAL = ("TARGET_RA", "TARGET_DEC", "Z", "SNR_MEDIAN", *RESIDUAL_COLUMNS)

FEATURE_COLUMNS: tuple[str, ...] = (
    "ALPHA_CONT",
    *(f"{kind}_{line.name}" for line in BROAD_LINES for kind in ("EW", "FWHM")),
    "BI_CIV",
    "BAL_FLAG",
)
PROVENANCE_COLUMNS = ("TILEID", "FIBER", "LASTNIGHT", "SOURCE_FILE", "CHECKPOINT_SHA256")

#: Catalog columns in order; PROVENANCE_COLUMNS[:3], SNR_MEDIAN, the residual statistics and
#: features are present when the scores table has them.
CATALOG_COLUMNS: tuple[str, ...] = (
    "TARGETID",
    "PARTITION",
    "TARGET_RA",
    "TARGET_DEC",
    "Z",
    "ANOMALY_SCORE",
    "P_VALUE",
    "Q_VALUE",
    "RANK",
    "CLUSTER",
    "TYPE",
    "KNOWN_TYPE",
    "KNOWN_NAME",
    "FOLLOWUP_PRIORITY",
    "SNR_MEDIAN",
    *RESIDUAL_COLUMNS,
    *PROVENANCE_COLUMNS,
    *FEATURE_COLUMNS,
)

#: Units (astropy strings) of catalog columns; columns not listed are dimensionless.
UNITS: dict[str, str] = {
    "TARGET_RA": "deg",
    "TARGET_DEC": "deg",
    **{f"EW_{line.name}": "Angstrom" for line in BROAD_LINES},
    **{f"FWHM_{line.name}": "km/s" for line in BROAD_LINES},
    "BI_CIV": "km/s",
}

#: One-line descriptions, written as FITS TCOMMn keywords (shown by TOPCAT).
DESCRIPTIONS: dict[str, str] = {
    "TARGETID": "DESI unique target identifier",
    "PARTITION": "healpix coadd key {survey}-{program}-{healpix}",
    "TARGET_RA": "right ascension (ICRS)",
    "TARGET_DEC": "declination (ICRS)",
    "Z": "redrock redshift",
    "ANOMALY_SCORE": "combined detector score, larger = more anomalous",
    "P_VALUE": "conformal p-value within its S/N x z stratum",
    "Q_VALUE": "Benjamini-Hochberg q-value over all scored spectra",
    "RANK": "1 = most anomalous (by q-value, then score)",
    "CLUSTER": "HDBSCAN cluster of the anomaly, -1 = unclustered",
    "TYPE": "anomaly type of its cluster",
    "KNOWN_TYPE": "type in the known-anomaly list, empty if not listed",
    "KNOWN_NAME": "name in the known-anomaly list, empty if not listed",
    "FOLLOWUP_PRIORITY": "high / medium / low follow-up priority",
    "SNR_MEDIAN": "median per-pixel S/N over good observed pixels",
    "RECON_RCHI2": "reduced chi2 of the VAE reconstruction",
    "RESID_DIP": "strongest missed absorption redward of Lya, box-filter significance (sigma)",
    "RESID_PEAK": "strongest missed emission, box-filter significance (sigma)",
    "FOREST_DIP": "strongest missed absorption in the Lya forest, box-filter significance (sigma)",
    "TILEID": "tile of the latest exposure",
    "FIBER": "fibre of the latest exposure",
    "LASTNIGHT": "night (YYYYMMDD) of the latest exposure",
    "SOURCE_FILE": "coadd file, relative to the release root",
    "CHECKPOINT_SHA256": "sha256 of the VAE checkpoint used",
    "ALPHA_CONT": "continuum power-law index, f_lambda ~ lambda^alpha",
    **{f"EW_{line.name}": f"rest-frame equivalent width of {line.name}" for line in BROAD_LINES},
    **{f"FWHM_{line.name}": f"FWHM of {line.name}" for line in BROAD_LINES},
    "BI_CIV": "C IV balnicity index",
    "BAL_FLAG": "BI_CIV > 0",
}


class CatalogError(DesiAnomalyError, ValueError):
    """Inputs that cannot make a valid catalog (missing columns, duplicate TARGETIDs...)."""


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CatalogError(f"{what} lacks required column(s) {missing}")


def _check_unique(targetid: pd.Series, what: str) -> None:
    dup = targetid[targetid.duplicated()]
    if len(dup):
        raise CatalogError(
            f"{what} has {dup.nunique()} duplicated TARGETID(s), e.g. {dup.iloc[:5].tolist()}: "
            "keep one spectrum per target (e.g. the primary coadd) before cataloguing"
        )


def source_file(partition: str) -> str:
    """Coadd file of a partition key, relative to the release root."""
    key = parse_key(partition)
    return str(key.directory / key.coadd_name())


def followup_priority(
    type_: pd.Series, known_type: pd.Series, snr: pd.Series, *, min_snr: float
) -> np.ndarray:
    """FOLLOWUP_PRIORITY of catalogued spectra (rule in the module docstring)."""
    artefact = type_.to_numpy() == TYPE_ARTEFACT
    known = known_type.fillna("").to_numpy() != ""
    bright = snr.to_numpy(dtype=np.float64, na_value=np.nan) >= min_snr
    return np.where(artefact, "low", np.where(~known & bright, "high", "medium"))


def build_catalog(
    scores: pd.DataFrame,
    clusters: pd.DataFrame,
    *,
    alpha: float = DEFAULT_ALPHA,
    checkpoint_sha256: str = "",
    followup_snr: float = DEFAULT_FOLLOWUP_SNR,
) -> pd.DataFrame:
    """The ranked catalog of spectra with ``Q_VALUE < alpha`` (columns: ``CATALOG_COLUMNS``).

    ``scores``: one row per spectrum (all scored spectra, or any superset of the significant ones)
    with SCORES_REQUIRED, TARGET_RA, TARGET_DEC and Z; provenance, SNR_MEDIAN, RECON_RCHI2 and
    feature columns are carried over when present. ``clusters``: TARGETID, CLUSTER, TYPE and
    optionally KNOWN_TYPE, KNOWN_NAME; a catalogued spectrum without a row gets CLUSTER -1 and
    TYPE ``unknown``. Raises CatalogError for missing columns or duplicated TARGETIDs.
    """
    if not 0.0 < alpha <= 1.0:
        raise CatalogError(f"alpha must be in (0, 1], got {alpha}")
    _require(scores, (*SCORES_REQUIRED, "TARGET_RA", "TARGET_DEC", "Z"), "scores")
    _require(clusters, ("TARGETID", "CLUSTER", "TYPE"), "clusters")
    _check_unique(clusters["TARGETID"], "clusters")
    cat = scores.loc[scores["Q_VALUE"] < alpha, [c for c in CATALOG_COLUMNS if c in scores]]
    _check_unique(cat["TARGETID"], "the significant spectra")

    cat = cat.sort_values(
        ["Q_VALUE", "ANOMALY_SCORE", "TARGETID"], ascending=[True, False, True], kind="stable"
    ).reset_index(drop=True)
    cat["RANK"] = np.arange(1, len(cat) + 1, dtype=np.int64)

    cl = clusters[
        [c for c in ("TARGETID", "CLUSTER", "TYPE", "KNOWN_TYPE", "KNOWN_NAME") if c in clusters]
    ]
    cat = cat.merge(cl, on="TARGETID", how="left", validate="one_to_one")
    cat["CLUSTER"] = cat["CLUSTER"].fillna(NOISE_CLUSTER).astype(np.int64)
    cat["TYPE"] = cat["TYPE"].fillna("unknown").astype(str)
    for col in ("KNOWN_TYPE", "KNOWN_NAME"):
        cat[col] = cat[col].fillna("").astype(str) if col in cat else ""
    snr = cat["SNR_MEDIAN"] if "SNR_MEDIAN" in cat else pd.Series(np.nan, index=cat.index)
    cat["FOLLOWUP_PRIORITY"] = followup_priority(
        cat["TYPE"], cat["KNOWN_TYPE"], snr, min_snr=followup_snr
    )
    if "SOURCE_FILE" not in cat:
        cat["SOURCE_FILE"] = [source_file(p) for p in cat["PARTITION"]]
    cat["CHECKPOINT_SHA256"] = checkpoint_sha256
    return cat[[c for c in CATALOG_COLUMNS if c in cat]]
