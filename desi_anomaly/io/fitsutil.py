"""Thin fitsio helpers that turn library failures into errors naming the file and the problem."""

from __future__ import annotations

import contextlib
import os
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
    present = hdu_names(fits)
    missing = [n for n in names if n not in present]
    if missing:
        raise DesiFormatError(path, f"missing HDU(s) {', '.join(missing)}")


def read_columns(
    fits: fitsio.FITS,
    path: str | Path,
    ext: str | int,
    required: Sequence[str],
    optional: Sequence[str] = (),
    rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Read only the named columns of a binary table (native byte order, strings decoded).

    Returns the required columns, then the optional ones present; missing required ones raise.
    """
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
    return {c: _native(data[present[c]]) for c in columns}


def read_table(
    fits: fitsio.FITS,
    path: str | Path,
    ext: str | int,
    required: Sequence[str],
    optional: Sequence[str] = (),
    rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """``read_columns`` as a DataFrame."""
    return pd.DataFrame(read_columns(fits, path, ext, required, optional, rows))


#: Big-endian dtype of each BITPIX.
BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def read_image_rows(fits: fitsio.FITS, path: str | Path, ext: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted) of an image HDU whose first axis is the spectrum index, native order.

    Each contiguous run of rows is one read. Uncompressed images of a plain file are read with
    ``os.preadv`` straight into the output (unscaled or unsigned-integer data); anything else
    (gzipped file, tile-compressed or scaled image) goes through fitsio.
    """
    hdu = fits[ext]
    info = hdu.get_info()
    shape = (len(rows), *info["dims"][1:])
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = list(zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True)) if len(rows) else []
    plain = Path(path).suffix.lower() in (".fits", ".fit", ".fts")
    sign_bit = _unsigned_offset(hdu, info) if plain else None
    if sign_bit is None:
        rest = (slice(None),) * (len(shape) - 1)
        chunks = [hdu[(slice(int(rows[s]), int(rows[e - 1]) + 1), *rest)] for s, e in runs]
        if not chunks:
            return np.zeros(shape, dtype=np.float32)
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    raw = np.dtype(BITPIX_DTYPES[info["img_type"]])
    if sign_bit:  # offset integers: the stored bits are the value with its top bit flipped
        raw = np.dtype(f">u{raw.itemsize}")
    out = np.empty(shape, dtype=raw)
    row_bytes = out[:1].nbytes
    fd = os.open(path, os.O_RDONLY)
    try:
        for s, e in runs:
            want = (e - s) * row_bytes
            got = os.preadv(fd, [out[s:e]], info["data_start"] + int(rows[s]) * row_bytes)
            if got != want:
                raise DesiFormatError(path, f"truncated FITS file: short read of HDU {ext}")
    finally:
        os.close(fd)
    out = out.byteswap(inplace=True).view(out.dtype.newbyteorder("="))
    if sign_bit:
        out ^= out.dtype.type(sign_bit)
    return out


def _unsigned_offset(hdu: fitsio.hdu.ImageHDU, info: dict) -> int | None:
    """0 for unscaled data, the sign bit for BZERO-offset unsigned integers, None otherwise."""
    if info["is_compressed_image"] or info["img_type"] not in BITPIX_DTYPES:
        return None
    header = hdu.read_header()
    bscale, bzero = header.get("BSCALE", 1), header.get("BZERO", 0)
    if bscale == 1 and bzero == 0:
        return 0
    bits = abs(info["img_type"])
    if bscale == 1 and info["img_type"] > 8 and bzero == 2 ** (bits - 1):
        return 2 ** (bits - 1)
    return None


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
