"""Recovery of known anomalous quasars: sky cross-match of a known-anomaly list with the scores.

A known-anomaly list (CSV, Parquet or FITS; e.g. SQuAD I: SDSS_NAME, RA, DEC, Z, r_mag,
Anomaly_Type) is matched to a scores or catalog table (TARGET_RA, TARGET_DEC, TARGETID, and RANK /
Q_VALUE when present) by nearest neighbour on the unit sphere (a KD-tree on unit vectors: about a
second for 1.6M rows) within ``radius_arcsec`` (default 1 arcsec).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from desi_anomaly.errors import DesiAnomalyError

DEFAULT_RADIUS_ARCSEC = 1.0
#: Accepted column names (case-insensitive), in order of preference.
RA_NAMES = ("RA", "TARGET_RA", "RAJ2000", "RA_DEG")
DEC_NAMES = ("DEC", "TARGET_DEC", "DEJ2000", "DEC_DEG")
TYPE_NAMES = ("KNOWN_TYPE", "ANOMALY_TYPE", "TYPE", "CLASS")
NAME_NAMES = ("KNOWN_NAME", "NAME", "SDSS_NAME", "OBJECT")


class KnownListError(DesiAnomalyError, ValueError):
    """A known-anomaly list or scores table that cannot be cross-matched: names file and column."""


def _find(columns: list[str], names: tuple[str, ...]) -> str | None:
    upper = {c.upper(): c for c in columns}
    return next((upper[n] for n in names if n in upper), None)


def read_known_anomalies(
    path: str | Path,
    *,
    ra: str | None = None,
    dec: str | None = None,
    type_column: str | None = None,
    name_column: str | None = None,
) -> pd.DataFrame:
    """Read a known-anomaly list as RA, DEC (deg), KNOWN_TYPE, KNOWN_NAME (strings, may be empty).

    Exactly repeated rows (SQuAD I lists 168 objects twice) are dropped with a warning; entries at
    one position with different types are kept.

    Columns are found by the names in RA_NAMES, DEC_NAMES, TYPE_NAMES and NAME_NAMES unless given.
    Raises KnownListError naming the file and the missing or invalid column.
    """
    path = Path(path)
    if not path.is_file():
        raise KnownListError(f"{path}: known-anomaly list does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        elif path.suffix.lower() in (".fits", ".fit", ".gz") and ".fit" in path.name.lower():
            from astropy.table import Table

            table = Table.read(path).to_pandas()
        else:
            table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise KnownListError(f"{path}: cannot read the known-anomaly list ({exc})") from exc
    cols = list(table.columns)
    ra = ra or _find(cols, RA_NAMES)
    dec = dec or _find(cols, DEC_NAMES)
    for what, col, names in (("RA", ra, RA_NAMES), ("DEC", dec, DEC_NAMES)):
        if col is None or col not in table:
            raise KnownListError(
                f"{path}: no {what} column (looked for {col or ' / '.join(names)}); "
                f"columns are {cols}"
            )
    out = pd.DataFrame(
        {
            "RA": pd.to_numeric(table[ra], errors="coerce").to_numpy(np.float64),
            "DEC": pd.to_numeric(table[dec], errors="coerce").to_numpy(np.float64),
        }
    )
    for target, given, names in (
        ("KNOWN_TYPE", type_column, TYPE_NAMES),
        ("KNOWN_NAME", name_column, NAME_NAMES),
    ):
        col = given or _find(cols, names)
        if given is not None and given not in table:
            raise KnownListError(f"{path}: no column {given!r}; columns are {cols}")
        out[target] = table[col].fillna("").astype(str).str.strip() if col else ""
    _check_coordinates(out["RA"].to_numpy(), out["DEC"].to_numpy(), f"{path}: columns {ra}/{dec}")
    repeated = out.duplicated()
    if repeated.any():
        warnings.warn(
            f"{path}: {int(repeated.sum())} repeated row(s) (same position, type and name) dropped",
            stacklevel=2,
        )
        out = out[~repeated].reset_index(drop=True)
    return out


def _check_coordinates(ra: np.ndarray, dec: np.ndarray, what: str) -> None:
    bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise KnownListError(
            f"{what}: {int(bad.sum())} row(s) with missing or invalid RA/DEC (first at row {first})"
        )


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """(n, 3) unit vectors of sky positions in degrees."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.column_stack((np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)))


def _chord(arcsec: float) -> float:
    return 2.0 * np.sin(np.radians(arcsec / 3600.0) / 2.0)


def crossmatch_known(
    scores: pd.DataFrame, known: pd.DataFrame, *, radius_arcsec: float = DEFAULT_RADIUS_ARCSEC
) -> pd.DataFrame:
    """Nearest known anomaly within ``radius_arcsec`` of each row of ``scores``.

    Returns one row per row of ``scores`` (same order): TARGETID, KNOWN_TYPE and KNOWN_NAME (empty
    strings when unmatched; the distinct values of every entry within the radius, nearest first,
    joined by '; '), KNOWN_SEP_ARCSEC (to the nearest, NaN when unmatched) and KNOWN_INDEX (row
    of ``known`` of the nearest, -1 when unmatched). Rows without a finite position are unmatched.
    """
    for col in ("TARGETID", "TARGET_RA", "TARGET_DEC"):
        if col not in scores:
            raise KnownListError(f"scores table has no {col} column; columns are {list(scores)}")
    for col in ("RA", "DEC", "KNOWN_TYPE", "KNOWN_NAME"):
        if col not in known:
            raise KnownListError(
                f"known-anomaly table has no {col} column (read it with read_known_anomalies)"
            )
    if radius_arcsec <= 0:
        raise KnownListError(f"radius_arcsec must be positive, got {radius_arcsec}")
    ra = scores["TARGET_RA"].to_numpy(np.float64)
    dec = scores["TARGET_DEC"].to_numpy(np.float64)
    n = len(scores)
    index = np.full(n, -1, dtype=np.int64)
    sep = np.full(n, np.nan)
    finite = np.isfinite(ra) & np.isfinite(dec)
    if len(known) and finite.any():
        tree = cKDTree(unit_vectors(known["RA"].to_numpy(), known["DEC"].to_numpy()))
        dist, idx = tree.query(
            unit_vectors(ra[finite], dec[finite]), k=1, distance_upper_bound=_chord(radius_arcsec)
        )
        hit = np.isfinite(dist)
        rows = np.flatnonzero(finite)[hit]
        index[rows] = idx[hit]
        sep[rows] = np.degrees(2.0 * np.arcsin(np.clip(dist[hit] / 2.0, 0, 1))) * 3600.0
    types = np.full(n, "", dtype=object)
    names = np.full(n, "", dtype=object)
    rows = np.flatnonzero(index >= 0)
    if len(rows):
        all_types = known["KNOWN_TYPE"].astype(str).to_numpy()
        all_names = known["KNOWN_NAME"].astype(str).to_numpy()
        near = tree.query_ball_point(
            unit_vectors(ra[rows], dec[rows]), _chord(radius_arcsec) * (1 + 1e-9)
        )
        for row, entries in zip(rows, near, strict=True):
            entries = [index[row], *sorted(set(entries) - {index[row]})]
            types[row] = _join(all_types[entries])
            names[row] = _join(all_names[entries])
    return pd.DataFrame(
        {
            "TARGETID": scores["TARGETID"].to_numpy(),
            "KNOWN_TYPE": types.astype(str),
            "KNOWN_NAME": names.astype(str),
            "KNOWN_SEP_ARCSEC": sep,
            "KNOWN_INDEX": index,
        }
    )


def _join(values: np.ndarray) -> str:
    """Distinct non-empty values in order, joined by '; '."""
    return "; ".join(dict.fromkeys(v for v in values if v))


def known_recovery(
    scores: pd.DataFrame,
    known: pd.DataFrame,
    *,
    alpha: float = 0.01,
    radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
) -> pd.DataFrame:
    """One row per known anomaly: KNOWN_NAME, KNOWN_TYPE, RA, DEC, MATCHED, TARGETID (-1 when not
    matched), SEP_ARCSEC, RANK and Q_VALUE (when ``scores`` has them, else NaN) and RECOVERED
    (matched with Q_VALUE < ``alpha``). The closest scored spectrum represents each known one."""
    matches = crossmatch_known(scores, known, radius_arcsec=radius_arcsec)  # validates inputs
    row_of = np.full(len(known), -1, dtype=np.int64)
    sep_of = np.full(len(known), np.nan)
    ra = scores["TARGET_RA"].to_numpy(np.float64)
    dec = scores["TARGET_DEC"].to_numpy(np.float64)
    finite = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    if len(known) and len(finite) and (matches["KNOWN_INDEX"] >= 0).any():
        tree = cKDTree(unit_vectors(ra[finite], dec[finite]))
        dist, idx = tree.query(
            unit_vectors(known["RA"].to_numpy(), known["DEC"].to_numpy()),
            k=1,
            distance_upper_bound=_chord(radius_arcsec),
        )
        hit = np.isfinite(dist)
        row_of[hit] = finite[idx[hit]]
        sep_of[hit] = np.degrees(2.0 * np.arcsin(np.clip(dist[hit] / 2.0, 0, 1))) * 3600.0
    matched = row_of >= 0
    safe = np.maximum(row_of, 0)

    def column(name: str, fill: float) -> np.ndarray:
        if name not in scores or not len(scores):
            return np.full(len(known), fill)
        values = scores[name].to_numpy(np.float64)
        return np.where(matched, values[safe], fill)

    report = pd.DataFrame(
        {
            "KNOWN_NAME": known["KNOWN_NAME"].to_numpy(),
            "KNOWN_TYPE": known["KNOWN_TYPE"].to_numpy(),
            "RA": known["RA"].to_numpy(),
            "DEC": known["DEC"].to_numpy(),
            "MATCHED": matched,
            "TARGETID": np.where(
                matched, scores["TARGETID"].to_numpy(np.int64)[safe] if len(scores) else -1, -1
            ),
            "SEP_ARCSEC": sep_of,
            "RANK": column("RANK", np.nan),
            "Q_VALUE": column("Q_VALUE", np.nan),
        }
    )
    report["RECOVERED"] = report["MATCHED"] & (report["Q_VALUE"] < alpha)
    return report


def recovery_summary(report: pd.DataFrame) -> pd.DataFrame:
    """Per KNOWN_TYPE (and ``all``): N_KNOWN, N_MATCHED, N_RECOVERED and RECALL (recovered /
    matched, NaN when none matched)."""
    groups = [("all", report), *report.groupby("KNOWN_TYPE", sort=True)]
    rows = []
    for name, g in groups:
        n_matched = int(g["MATCHED"].sum())
        n_rec = int(g["RECOVERED"].sum())
        rows.append(
            {
                "KNOWN_TYPE": name,
                "N_KNOWN": len(g),
                "N_MATCHED": n_matched,
                "N_RECOVERED": n_rec,
                "RECALL": n_rec / n_matched if n_matched else np.nan,
            }
        )
    return pd.DataFrame(rows)


def merge_known(clusters: pd.DataFrame, matches: pd.DataFrame) -> pd.DataFrame:
    """``clusters`` (TARGETID, CLUSTER, TYPE) with KNOWN_TYPE/KNOWN_NAME from ``crossmatch_known``,
    ready for ``catalog.build.build_catalog``: matched spectra without a cluster row are added
    with CLUSTER -1 and TYPE ``unknown``; unmatched ones get empty strings."""
    for col in ("TARGETID", "CLUSTER", "TYPE"):
        if col not in clusters:
            raise KnownListError(f"clusters table has no {col} column")
    hits = matches.loc[matches["KNOWN_NAME"].ne("") | matches["KNOWN_TYPE"].ne("")]
    hits = hits[["TARGETID", "KNOWN_TYPE", "KNOWN_NAME"]].drop_duplicates("TARGETID")
    base = clusters.drop(columns=["KNOWN_TYPE", "KNOWN_NAME"], errors="ignore")
    out = base.merge(hits, on="TARGETID", how="outer", validate="one_to_one")
    out["CLUSTER"] = out["CLUSTER"].fillna(-1).astype(np.int64)
    out["TYPE"] = out["TYPE"].fillna("unknown").astype(str)
    for col in ("KNOWN_TYPE", "KNOWN_NAME"):
        out[col] = out[col].fillna("").astype(str)
    return out
