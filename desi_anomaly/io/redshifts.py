"""Redshift sources: the redrock ``REDSHIFTS`` table and QSO catalogues (TARGETID -> Z)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import fitsio
import numpy as np
import pandas as pd

from desi_anomaly.errors import DesiFormatError
from desi_anomaly.io.fitsutil import open_fits, read_table

REDROCK_COLUMNS = ("TARGETID", "Z", "ZERR", "ZWARN", "SPECTYPE", "DELTACHI2")
REDROCK_OPTIONAL = ("SUBTYPE",)


def read_redrock(path: str | Path) -> pd.DataFrame:
    """Read the redrock ``REDSHIFTS`` table: TARGETID, Z, ZERR, ZWARN, SPECTYPE, DELTACHI2."""
    with open_fits(path) as fits:
        table = read_table(fits, path, "REDSHIFTS", REDROCK_COLUMNS, REDROCK_OPTIONAL)
    table["SPECTYPE"] = table["SPECTYPE"].str.strip()
    if "SUBTYPE" in table:
        table["SUBTYPE"] = table["SUBTYPE"].str.strip()
    _check_unique(table["TARGETID"].to_numpy(), path, "REDSHIFTS")
    return table


@dataclass(frozen=True)
class QSOCatalog:
    """A QSO catalogue (e.g. DESI's QSO value-added catalogue): sorted TARGETID -> Z lookup.

    Loaded once and shared by many partitions; only TARGETID, Z and, when present, TARGET_RA,
    TARGET_DEC and LASTNIGHT are read. A TARGETID listed more than once (cumulative catalogues
    can hold one row per observation) keeps its latest row (by LASTNIGHT, else the last one),
    with a warning giving the count.
    """

    path: str
    targetid: np.ndarray  # sorted int64
    z: np.ndarray
    ra: np.ndarray | None
    dec: np.ndarray | None

    @classmethod
    def read(cls, path: str | Path) -> QSOCatalog:
        with open_fits(path) as fits:
            ext = _first_table(fits, path)
            optional = ("TARGET_RA", "TARGET_DEC", "LASTNIGHT")
            table = read_table(fits, path, ext, ("TARGETID", "Z"), optional)
        order_cols = ["TARGETID", "LASTNIGHT"] if "LASTNIGHT" in table else ["TARGETID"]
        table = table.sort_values(order_cols, kind="stable")
        latest = ~table["TARGETID"].duplicated(keep="last").to_numpy()
        if not latest.all():
            warnings.warn(
                f"{path}: {int((~latest).sum())} repeated TARGETID row(s); kept the latest of each",
                stacklevel=2,
            )
        table = table[latest]
        has_radec = "TARGET_RA" in table and "TARGET_DEC" in table
        return cls(
            path=str(path),
            targetid=table["TARGETID"].to_numpy(np.int64),
            z=table["Z"].to_numpy(np.float64),
            ra=table["TARGET_RA"].to_numpy(np.float64) if has_radec else None,
            dec=table["TARGET_DEC"].to_numpy(np.float64) if has_radec else None,
        )

    def __len__(self) -> int:
        return len(self.targetid)

    def locate(self, targetid: np.ndarray) -> np.ndarray:
        """Index into the catalogue for each TARGETID, or -1 where it is not catalogued."""
        pos = np.searchsorted(self.targetid, targetid)
        pos = np.clip(pos, 0, max(len(self.targetid) - 1, 0))
        found = (len(self.targetid) > 0) & (self.targetid[pos] == targetid)
        return np.where(found, pos, -1)


def _first_table(fits: fitsio.FITS, path: str | Path) -> str | int:
    """The ``QSO_CAT``/``ZCATALOG`` extension if present, else the first binary table."""
    names = [hdu.get_extname() for hdu in fits]
    for preferred in ("QSO_CAT", "ZCATALOG", "REDSHIFTS"):
        if preferred in names:
            return preferred
    for i, hdu in enumerate(fits):
        if hdu.get_exttype() == "BINARY_TBL":
            return i
    raise DesiFormatError(path, "no binary table found: not a QSO catalogue")


def _check_unique(targetid: np.ndarray, path: str | Path, ext: str | int) -> None:
    uniq, counts = np.unique(targetid, return_counts=True)
    if len(uniq) != len(targetid):
        dup = uniq[counts > 1]
        raise DesiFormatError(
            path,
            f"{ext}: {len(dup)} duplicate TARGETID value(s), e.g. {dup[:3].tolist()}",
        )
