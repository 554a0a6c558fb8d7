"""Recovery metrics of injected anomalies and the ADBench-style export of labelled scores.

The scored table has one row per spectrum: ANOMALY (``none`` for the un-injected normal
spectra, else the injected class), SNR_BIN_VALUE and Z_BIN_VALUE (the S/N and redshift used for
binning, normally those of the un-injected original) and, per method, a score column and a q-value
column. For each method, class and (S/N, z) bin:

- ``AUROC``: ``sklearn.metrics.roc_auc_score`` of the score, injected spectra of the class against
  the normal spectra of the same bin (NaN when either is absent);
- ``RECALL``: fraction of the injected spectra with q-value < ``alpha``;
- ``RECALL_P`` (when a p-value column is given): fraction with p-value < ``alpha``, the recall at a
  per-spectrum false-positive rate ``alpha``, free of the Benjamini-Hochberg dependence on the
  share of anomalies in the catalogue.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from desi_anomaly.atomic import atomic_path

from .injection import NO_ANOMALY, InjectionError

#: Bins of the recovery tables (S/N: median per-pixel S/N; the design targets S/N > 5).
REPORT_SNR_EDGES = np.array([0.0, 2.0, 5.0, np.inf])
REPORT_Z_EDGES = np.array([0.0, 1.5, 2.5, np.inf])
ALL = "all"


def bin_labels(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Labels like ``2-5`` or ``>5`` of the bins (``edges``) holding each value."""
    edges = np.asarray(edges, dtype=np.float64)
    names = [
        f">{_fmt(lo)}" if np.isinf(hi) else f"{_fmt(lo)}-{_fmt(hi)}"
        for lo, hi in itertools.pairwise(edges)
    ]
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(names) - 1)
    return np.asarray(names, dtype=object)[idx]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _auroc(normal: np.ndarray, injected: np.ndarray) -> float:
    normal, injected = normal[np.isfinite(normal)], injected[np.isfinite(injected)]
    if not len(normal) or not len(injected):
        return np.nan
    y = np.r_[np.zeros(len(normal)), np.ones(len(injected))]
    return float(roc_auc_score(y, np.r_[normal, injected]))


def recovery_table(
    scored: pd.DataFrame,
    methods: dict[str, tuple[str, ...]],
    *,
    alpha: float = 0.01,
    snr_edges: np.ndarray = REPORT_SNR_EDGES,
    z_edges: np.ndarray = REPORT_Z_EDGES,
) -> pd.DataFrame:
    """AUROC and recall at q < ``alpha`` per method x class x S/N bin x z bin (and ``all`` bins).

    ``methods`` maps a method name to its (score column, q-value column[, p-value column]) in
    ``scored``. Columns of the result: METHOD, ANOMALY, SNR_BIN, Z_BIN, N_INJECTED, N_NORMAL,
    AUROC, RECALL, RECALL_P (NaN without a p-value column).
    """
    need = {"ANOMALY", "SNR_BIN_VALUE", "Z_BIN_VALUE"} | {c for m in methods.values() for c in m}
    missing = sorted(need - set(scored.columns))
    if missing:
        raise InjectionError(f"scored table lacks column(s) {missing}")
    df = scored.assign(
        SNR_BIN=bin_labels(scored["SNR_BIN_VALUE"].to_numpy(), snr_edges),
        Z_BIN=bin_labels(scored["Z_BIN_VALUE"].to_numpy(), z_edges),
    )
    kinds = [k for k in pd.unique(df["ANOMALY"]) if k != NO_ANOMALY]
    rows = []
    for snr_bin in [ALL, *pd.unique(df["SNR_BIN"])]:
        for z_bin in [ALL, *pd.unique(df["Z_BIN"])]:
            sel = np.ones(len(df), dtype=bool)
            if snr_bin != ALL:
                sel &= df["SNR_BIN"].to_numpy() == snr_bin
            if z_bin != ALL:
                sel &= df["Z_BIN"].to_numpy() == z_bin
            part = df[sel]
            normal = part[part["ANOMALY"] == NO_ANOMALY]
            for kind in kinds:
                inj = part[part["ANOMALY"] == kind]
                if not len(inj):
                    continue
                for name, (score_col, q_col, *p_col) in methods.items():
                    p = inj[p_col[0]].to_numpy(float) if p_col else np.full(1, np.nan)
                    rows.append(
                        {
                            "METHOD": name,
                            "ANOMALY": kind,
                            "SNR_BIN": snr_bin,
                            "Z_BIN": z_bin,
                            "N_INJECTED": len(inj),
                            "N_NORMAL": len(normal),
                            "AUROC": _auroc(
                                normal[score_col].to_numpy(float), inj[score_col].to_numpy(float)
                            ),
                            "RECALL": float(np.mean(inj[q_col].to_numpy(float) < alpha)),
                            "RECALL_P": float(np.mean(p < alpha)) if p_col else np.nan,
                        }
                    )
    return pd.DataFrame(rows)


def side_by_side(table: pd.DataFrame) -> pd.DataFrame:
    """``recovery_table`` output with one row per class and bin and a column per method/metric
    (e.g. AUROC_ensemble, RECALL_pca)."""
    index = ["ANOMALY", "SNR_BIN", "Z_BIN", "N_INJECTED", "N_NORMAL"]
    values = ["AUROC", "RECALL"] + (["RECALL_P"] if table["RECALL_P"].notna().any() else [])
    wide = table.pivot(index=index, columns="METHOD", values=values)
    wide.columns = [f"{metric}_{method}" for metric, method in wide.columns]
    return wide.reset_index()


def export_adbench(
    path: str | Path,
    latents: np.ndarray,
    labels: np.ndarray,
    *,
    scores: dict[str, np.ndarray],
    anomaly: np.ndarray | None = None,
    **extra: np.ndarray,
) -> Path:
    """Write labelled scores as an ADBench-style ``.npz`` atomically.

    Arrays: ``X`` (latents, n x d float32), ``y`` (1 = injected anomaly, 0 = normal), one
    ``score_{name}`` per entry of ``scores``, ``anomaly`` (class name per row) when given, and any
    ``extra`` arrays of length n (e.g. snr, z, targetid).
    """
    x = np.asarray(latents, dtype=np.float32)
    y = np.asarray(labels).astype(np.int64)
    n = len(x)
    arrays: dict[str, np.ndarray] = {"X": x, "y": y}
    arrays.update({f"score_{k}": np.asarray(v, dtype=np.float64) for k, v in scores.items()})
    if anomaly is not None:
        arrays["anomaly"] = np.asarray(anomaly, dtype=str)
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    bad = {k: v.shape for k, v in arrays.items() if len(v) != n}
    if x.ndim != 2 or bad or not np.isin(y, (0, 1)).all():
        raise InjectionError(
            f"ADBench export needs 2-D X, 0/1 labels and arrays of {n} rows; shapes {bad}"
        )
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def read_adbench(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``export_adbench`` file."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
