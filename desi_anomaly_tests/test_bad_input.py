"""Bad input gets a clear error naming the file and the problem (or defined, warned behaviour)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from desi_anomaly.errors import DesiFormatError
from desi_anomaly.io.coadd import DesiDataWarning, read_qso_spectra
from desi_anomaly.io.partitions import discover
from desi_anomaly.io.redshifts import read_redrock
from desi_anomaly_tests.fitsedit import rewrite_fits


@pytest.fixture
def pair(small_drop, tmp_path) -> tuple[Path, Path]:
    """A private copy of one mock coadd + redrock pair, free to break."""
    files = discover(small_drop).complete[0]
    coadd = shutil.copy(files.coadd, tmp_path / files.coadd.name)
    redrock = shutil.copy(files.redrock, tmp_path / files.redrock.name)
    return Path(coadd), Path(redrock)


def _edit(path: Path, edits) -> Path:
    out = path.with_name("edited-" + path.name)
    rewrite_fits(path, out, edits)
    return out


def _expect(coadd, redrock, match: str, path: Path | None = None) -> DesiFormatError:
    with pytest.raises(DesiFormatError, match=match) as info:
        read_qso_spectra(coadd, redrock)
    assert info.value.path == str(path or coadd)
    return info.value


def test_valid_pair_reads(pair):
    spectra = read_qso_spectra(*pair)
    assert len(spectra) > 0 and np.isfinite(spectra.flux).all()


def test_truncated_file(pair):
    coadd, redrock = pair
    data = coadd.read_bytes()
    coadd.write_bytes(data[: len(data) // 2])
    _expect(coadd, redrock, "truncated FITS file")
    coadd.write_bytes(data[: 2880 * 40 + 17])  # cut inside the headers
    _expect(coadd, redrock, "truncated FITS file|not a readable FITS")


def test_not_a_fits_file(pair):
    coadd, redrock = pair
    coadd.write_bytes(b"SIMPLE  = garbage" + bytes(range(256)) * 20)
    _expect(coadd, redrock, "not a readable FITS file")


def test_missing_file(pair, tmp_path):
    _, redrock = pair
    _expect(tmp_path / "nope.fits", redrock, "file not found")


def test_missing_hdu(pair):
    coadd, redrock = pair
    broken = _edit(coadd, {"R_IVAR": None})
    err = _expect(broken, redrock, "missing HDU")
    assert "R_IVAR" in err.problem


def test_missing_column(pair):
    coadd, redrock = pair
    broken = _edit(redrock, {"REDSHIFTS": lambda t: _drop_field(t, "Z")})
    _expect(coadd, broken, "lacks column.*Z", path=broken)


def test_targetid_mismatch(pair):
    coadd, redrock = pair

    def shift(t):
        t = t.copy()
        t["TARGETID"][:3] += 1
        return t

    broken = _edit(redrock, {"REDSHIFTS": shift})
    err = _expect(coadd, broken, "TARGETID mismatch with redrock")
    assert "3 only in the coadd" in err.problem


def test_duplicate_targetids(pair):
    coadd, redrock = pair

    def dup(t):
        t = t.copy()
        t["TARGETID"][1] = t["TARGETID"][0]
        return t

    _expect(_edit(coadd, {"FIBERMAP": dup}), redrock, "duplicate TARGETID")
    broken_rr = _edit(redrock, {"REDSHIFTS": dup})
    _expect(coadd, broken_rr, "duplicate TARGETID", path=broken_rr)


def test_shape_mismatch(pair):
    coadd, redrock = pair
    broken = _edit(coadd, {"B_IVAR": lambda a: a[:, :-5]})
    _expect(broken, redrock, r"B_IVAR has shape")
    broken = _edit(coadd, {"Z_FLUX": lambda a: a[:-1]})
    _expect(broken, redrock, r"Z_FLUX has \d+ rows but FIBERMAP has")


def _qso_row(coadd, redrock) -> int:
    """Row in the coadd of the first selected QSO."""
    import fitsio

    first = read_qso_spectra(coadd, redrock).targetid[0]
    return int(np.flatnonzero(fitsio.read(str(coadd), "FIBERMAP")["TARGETID"] == first)[0])


@pytest.mark.parametrize(
    ("ext", "value"),
    [("R_FLUX", np.nan), ("B_FLUX", np.inf), ("Z_IVAR", -1.0), ("B_IVAR", np.nan)],
)
def test_invalid_pixel_values_masked_with_warning_or_strict_error(pair, ext, value):
    coadd, redrock = pair
    row = _qso_row(coadd, redrock)

    def poison(a):
        a = a.copy()
        a[row, 100:110] = value
        return a

    broken = _edit(coadd, {ext: poison})
    with pytest.warns(DesiDataWarning, match=f"{ext[0]} arm has 10 pixel"):
        spectra = read_qso_spectra(broken, redrock)
    assert spectra.meta["N_INVALID_PIX"].iloc[0] == 10
    assert spectra.meta["N_INVALID_PIX"].iloc[1:].eq(0).all()
    assert np.isfinite(spectra.flux).all() and (spectra.ivar >= 0).all()
    with pytest.raises(DesiFormatError, match="NaN/inf flux or ivar or negative ivar"):
        read_qso_spectra(broken, redrock, strict=True)


def test_zero_qsos_is_a_valid_empty_result(pair):
    coadd, redrock = pair

    def no_qsos(t):
        t = t.copy()
        t["SPECTYPE"] = "GALAXY"
        return t

    rr = _edit(redrock, {"REDSHIFTS": no_qsos})
    assert (read_redrock(rr)["SPECTYPE"] == "GALAXY").all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectra = read_qso_spectra(coadd, rr)
    assert len(spectra) == 0
    assert spectra.flux.shape == (0, len(spectra.wave)) and len(spectra.wave) > 7000


def _drop_field(table: np.ndarray, name: str) -> np.ndarray:
    keep = [n for n in table.dtype.names if n != name]
    return table[keep]
