"""Thin fitsio helpers that turn library failures into errors naming the file and the problem."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import fitsio
import numpy as np
import pandas as pd

from desi_anomaly.errors import DesiFormatError


@contextlib.contextmanager
def open_fits(path: str | Path) -> Iterator[fitsio.FITS]:
    """Open a ``.fits``/``.fits.gz`` file read-only; cfitsio failures become DesiFormatError."""
    path = Path(path)
    if not path.is_file():
        raise DesiFormatError(path, "file not found")
    try:
        fits = fitsio.FITS(str(path), "r")
    except (OSError, ValueError) as exc:
        raise DesiFormatError(path, f"not a readable FITS file ({_first_line(exc)})") from exc
    try:
        if path.suffix != ".gz":
            _check_complete(fits, path)
        yield fits
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, DesiFormatError):
            raise
        raise DesiFormatError(path, f"corrupt or truncated FITS data ({_first_line(exc)})") from exc
    finally:
        fits.close()


def _check_complete(fits: fitsio.FITS, path: Path) -> None:
    """A FITS file is whole 2880-byte blocks holding every HDU's declared data."""
    size = path.stat().st_size
    needed = fits[len(fits) - 1].get_offsets()["data_end"]
    if needed > size:
        raise DesiFormatError(path, f"truncated FITS file: {size} bytes, its HDUs need {needed}")
    if size % 2880:
        raise DesiFormatError(
            path, f"truncated FITS file: {size} bytes is not whole 2880-byte blocks"
        )


def hdu_names(fits: fitsio.FITS) -> set[str]:
    return {hdu.get_extname().upper() for hdu in fits}


def require_hdus(fits: fitsio.FITS, path: str | Path, names: Sequence[str]) -> None:
    """Raise naming every required HDU that is missing."""
    missing = [n for n in names if n not in hdu_names(fits)]
    if missing:
        raise DesiFormatError(path, f"missing HDU(s) {', '.join(missing)}")


def read_table(
    fits: fitsio.FITS,
    path: str | Path,
    ext: str | int,
    required: Sequence[str],
    optional: Sequence[str] = (),
    rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """Read only the named columns of a binary table; missing required columns raise."""
    if isinstance(ext, str) and ext not in hdu_names(fits):
        raise DesiFormatError(path, f"missing HDU {ext}")
    hdu = fits[ext]
    if hdu.get_exttype() != "BINARY_TBL":
        raise DesiFormatError(path, f"HDU {ext} is not a binary table")
    present = {c.upper(): c for c in hdu.get_colnames()}
    missing = [c for c in required if c not in present]
    if missing:
        raise DesiFormatError(path, f"HDU {ext} lacks column(s) {', '.join(missing)}")
    columns = list(required) + [c for c in optional if c in present]
    data = hdu.read(columns=[present[c] for c in columns], rows=rows)
    return pd.DataFrame({c: _native(data[present[c]]) for c in columns})


def _native(col: np.ndarray) -> np.ndarray:
    """Byte-swap big-endian FITS columns to native order; decode strings."""
    if col.dtype.kind == "S":
        return col.astype(str)
    if col.dtype.byteorder not in ("=", "|"):
        return col.astype(col.dtype.newbyteorder("="))
    return col


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
