"""Mock DESI data drop: file layout and format, desispec compatibility, reproducibility, realised
population statistics measured on the written files, anomalies and truth table."""

from __future__ import annotations

import json

import fitsio
import healpy as hp
import numpy as np
import pandas as pd
import pytest

from desi_anomaly.io.instrument import ARMS, FLUX_UNIT, HPX_NSIDE, IVAR_UNIT, arm_wavelength
from desi_anomaly.io.partitions import discover
from desi_anomaly.mock import ANOMALY_KINDS, generate_drop, inject
from desi_anomaly.mock.distributions import DR1_SNR_QUANTILES, DR1_Z_QUANTILES
from desi_anomaly.mock.observe import median_snr, merge_arms
from desi_anomaly.mock.quasar import draw_qso_params, qso_components
from desi_anomaly.mock.sky import merged_wavelength

PER_TILE, N_TILES = 200, 10


@pytest.fixture(scope="module")
def small_drop(tmp_path_factory):
    """Two files with RESOLUTION HDUs."""
    out = tmp_path_factory.mktemp("small")
    calls = []
    summary = generate_drop(
        out, 2, 12, seed=5, others_per_tile=25, anomaly_fraction=0.5,
        include_resolution=True, progress=lambda d, t: calls.append((d, t)),
    )  # fmt: skip
    return out, summary, calls


@pytest.fixture(scope="module")
def big_drop(tmp_path_factory):
    """A few thousand QSOs to measure population statistics on the written files."""
    out = tmp_path_factory.mktemp("big")
    summary = generate_drop(
        out, N_TILES, PER_TILE, seed=11, others_per_tile=50, anomaly_fraction=0.1
    )
    return out, summary


def _read_partition(coadd):
    with fitsio.FITS(str(coadd)) as f:
        arms = [{a: f[f"{a}_{x}"].read() for a in ARMS} for x in ("FLUX", "IVAR", "MASK")]
        fibermap = f["FIBERMAP"].read()
    redshifts = fitsio.read(str(coadd).replace("coadd-", "redrock-"), "REDSHIFTS")
    return arms, fibermap, redshifts


def _selected(fibermap, redshifts):
    spectype = np.char.strip(redshifts["SPECTYPE"].astype(str))
    return (spectype == "QSO") & (redshifts["ZWARN"] == 0) & (fibermap["COADD_FIBERSTATUS"] == 0)


def test_layout_and_names(small_drop):
    out, summary, calls = small_drop
    found = discover(out)
    assert len(found.complete) == 2 and not found.incomplete
    for pair in found.complete:
        key = pair.key
        assert (key.survey, key.program) == ("main", "dark")
        assert (
            pair.coadd
            == out
            / "healpix/main/dark"
            / str(key.healpix // 100)
            / str(key.healpix)
            / f"coadd-main-dark-{key.healpix}.fits"
        )
    assert len({p.key.healpix for p in found.complete}) == 2
    assert sorted(summary.files) == sorted(
        [p.coadd for p in found.complete] + [p.redrock for p in found.complete]
    )
    assert summary.truth_path == out / "truth.parquet" and summary.truth_path.is_file()
    assert calls == [(1, 2), (2, 2)]
    assert summary.n_qso_selected == 24


def test_hdus_dtypes_shapes_headers(small_drop):
    out, _, _ = small_drop
    pair = discover(out).complete[0]
    with fitsio.FITS(str(pair.coadd)) as f:
        names = [h.get_extname() for h in f]
        expected = ["", "FIBERMAP", "EXP_FIBERMAP"]
        for a in ARMS:
            expected += [f"{a}_{x}" for x in ("WAVELENGTH", "FLUX", "IVAR", "MASK", "RESOLUTION")]
        assert names == [*expected, "SCORES"]
        hdr = f[0].read_header()
        assert hdr["SPGRP"] == "healpix" and hdr["HPXPIXEL"] == pair.key.healpix
        assert hdr["SPGRPVAL"] == pair.key.healpix and hdr["HPXNSIDE"] == HPX_NSIDE
        assert (
            str(hdr["HPXNEST"]) == "True" and hdr["SURVEY"] == "main" and hdr["PROGRAM"] == "dark"
        )
        fm = f["FIBERMAP"].read()
        n = len(fm)
        assert fm["TARGETID"].dtype == np.dtype(">i8") and fm["TARGET_RA"].dtype == np.dtype(">f8")
        pix = hp.ang2pix(HPX_NSIDE, fm["TARGET_RA"], fm["TARGET_DEC"], nest=True, lonlat=True)
        assert np.all(pix == pair.key.healpix)
        exp = f["EXP_FIBERMAP"].read()
        assert set(np.unique(exp["TARGETID"])) == set(fm["TARGETID"])
        counts = pd.Series(exp["TARGETID"].astype(np.int64)).value_counts()
        assert counts.between(1, 4).all()
        assert np.array_equal(
            counts.loc[fm["TARGETID"].astype(np.int64)].to_numpy(), fm["COADD_NUMEXP"]
        )
        for a in ARMS:
            wave = f[f"{a}_WAVELENGTH"].read()
            assert np.allclose(wave, arm_wavelength(a))
            bitpix = {x: f[f"{a}_{x}"].read_header()["BITPIX"] for x in
                      ("WAVELENGTH", "FLUX", "IVAR", "MASK", "RESOLUTION")}  # fmt: skip
            assert bitpix == {
                "WAVELENGTH": -64,
                "FLUX": -32,
                "IVAR": -32,
                "MASK": 32,
                "RESOLUTION": -32,
            }
            assert f[f"{a}_MASK"].read_header()["BZERO"] == 2**31  # unsigned 32-bit, as DESI
            assert f[f"{a}_WAVELENGTH"].read_header()["BUNIT"] == "Angstrom"
            assert f[f"{a}_FLUX"].read_header()["BUNIT"] == FLUX_UNIT
            assert f[f"{a}_IVAR"].read_header()["BUNIT"] == IVAR_UNIT
            assert f[f"{a}_IVAR"].read().shape == (n, len(wave))
            assert f[f"{a}_MASK"].read().dtype == np.uint32
            res = f[f"{a}_RESOLUTION"].read()
            assert res.shape == (n, 11, len(wave))
            assert np.allclose(res.sum(axis=1), 1.0, atol=1e-5)
            assert np.all(res[:, 5] > res[:, 4]) and np.allclose(res[:, 4], res[:, 6], rtol=0.05)
        assert f["SCORES"].read().dtype.names[:2] == ("TARGETID", "TSNR2_QSO_B")
    rr = fitsio.read(str(pair.redrock), "REDSHIFTS")
    assert np.array_equal(rr["TARGETID"], fm["TARGETID"])  # same row order as the FIBERMAP
    assert rr["COEFF"].shape == (n, 10)
    with fitsio.FITS(str(pair.redrock)) as f:
        assert f["REDSHIFTS"].read_header()["TFORM8"] == "6A"  # SPECTYPE str 6
    for col in ("CHI2", "Z", "ZERR", "ZWARN", "NPIXELS", "SUBTYPE", "NCOEFF", "DELTACHI2"):
        assert col in rr.dtype.names


def test_desispec_reads_mock_and_coadds_cameras(small_drop):
    desispec_io = pytest.importorskip("desispec.io")
    coaddition = pytest.importorskip("desispec.coaddition")
    out, _, _ = small_drop
    pair = discover(out).complete[0]
    spectra = desispec_io.read_spectra(str(pair.coadd))
    assert spectra.bands == ["b", "r", "z"]
    n = len(fitsio.read(str(pair.coadd), "FIBERMAP"))
    assert spectra.flux["z"].shape == (n, len(arm_wavelength("Z")))
    assert spectra.resolution_data["b"].shape == (n, 11, len(arm_wavelength("B")))
    assert len(spectra.exp_fibermap) >= n
    merged = coaddition.coadd_cameras(spectra)
    assert merged.flux["brz"].shape == (n, len(merged_wavelength()))
    (arms, _, _) = _read_partition(pair.coadd)
    _, ivar, _ = merge_arms(*arms)
    assert np.allclose(merged.ivar["brz"], ivar, rtol=1e-4)


def test_same_seed_same_arrays_other_seed_differs(tmp_path):
    a = generate_drop(tmp_path / "a", 1, 6, seed=3, others_per_tile=8)
    b = generate_drop(tmp_path / "b", 1, 6, seed=3, others_per_tile=8)
    c = generate_drop(tmp_path / "c", 1, 6, seed=4, others_per_tile=8)
    fa, fb, fc = a.files[0], b.files[0], c.files[0]
    assert fa.relative_to(tmp_path / "a") == fb.relative_to(tmp_path / "b")
    with fitsio.FITS(str(fa)) as x, fitsio.FITS(str(fb)) as y:
        for hdu in x:
            name = hdu.get_extname()
            if name:
                assert hdu.read().tobytes() == y[name].read().tobytes(), name
    assert fitsio.read(str(fa), "R_FLUX").tobytes() != fitsio.read(str(fc), "R_FLUX").tobytes()
    ta, tb = pd.read_parquet(a.truth_path), pd.read_parquet(b.truth_path)
    pd.testing.assert_frame_equal(ta, tb)


def test_redshift_and_snr_quantiles_match_dr1(big_drop):
    out, _summary = big_drop
    z, snr = [], []
    for pair in discover(out).complete:
        arms, fm, rr = _read_partition(pair.coadd)
        sel = _selected(fm, rr)
        flux, ivar, mask = merge_arms(*arms)
        snr.append(median_snr(flux, ivar, mask)[sel])
        z.append(rr["Z"][sel])
    z, snr = np.concatenate(z), np.concatenate(snr)
    assert len(z) == N_TILES * PER_TILE
    for p, target in DR1_Z_QUANTILES[1:8]:
        tol = 0.08 if 0.05 <= p <= 0.95 else 0.2
        assert abs(np.quantile(z, p) - target) < tol * (1 + target), (p, np.quantile(z, p), target)
    assert z.max() <= 6.8
    for p, target in DR1_SNR_QUANTILES[2:8]:
        tol = 0.12 if 0.25 <= p <= 0.75 else 0.3
        got = np.quantile(snr, p)
        assert abs(got / target - 1) < tol, (p, got, target)


def test_masked_and_zero_ivar_fractions(big_drop):
    out, _ = big_drop
    masked, zero = [], []
    for pair in discover(out).complete:
        (flux, ivar, mask), _fm, _rr = _read_partition(pair.coadd)
        for a in ARMS:  # DESI convention: bad pixels carry mask bits and ivar 0
            assert np.array_equal(mask[a] != 0, ivar[a] == 0)
        _, _iv, m = merge_arms(flux, ivar, mask)
        masked.append((m != 0).mean(axis=1))
        zero.append(
            sum((ivar[a] == 0).sum(axis=1) for a in ARMS) / sum(ivar[a].shape[1] for a in ARMS)
        )
    masked, zero = np.concatenate(masked), np.concatenate(zero)
    assert 0.002 < np.median(masked) < 0.007
    assert 0.006 < np.quantile(masked, 0.95) < 0.016
    assert masked.max() < 0.25
    assert 0.003 < zero.mean() < 0.008


def test_truth_table_consistent_with_files(big_drop):
    out, summary = big_drop
    truth = pd.read_parquet(summary.truth_path).set_index("TARGETID")
    assert truth.index.is_unique
    n_rows = 0
    for pair in discover(out).complete:
        _, fm, rr = _read_partition(pair.coadd)
        n_rows += len(fm)
        t = truth.loc[fm["TARGETID"].astype(np.int64)]
        assert (t["PARTITION"] == str(pair.key)).all()
        assert np.allclose(t["Z"], rr["Z"])
        assert np.array_equal(t["SPECTYPE"].to_numpy(), np.char.strip(rr["SPECTYPE"].astype(str)))
        assert np.array_equal(t["ZWARN"], rr["ZWARN"])
        assert np.array_equal(t["IS_QSO_SELECTED"].to_numpy(), _selected(fm, rr))
    assert n_rows == len(truth)
    assert summary.n_qso_selected == truth["IS_QSO_SELECTED"].sum() == N_TILES * PER_TILE
    assert summary.spectype_counts == truth["SPECTYPE"].value_counts().to_dict()


def test_non_qso_and_failed_qso_rows_present(big_drop):
    _, summary = big_drop
    truth = pd.read_parquet(summary.truth_path)
    assert {"GALAXY", "STAR", "QSO"} <= set(truth["SPECTYPE"])
    qso = truth[truth["SPECTYPE"] == "QSO"]
    assert (qso["ZWARN"] != 0).sum() > 0 and (qso["COADD_FIBERSTATUS"] != 0).sum() > 0
    assert not qso.loc[
        (qso["ZWARN"] != 0) | (qso["COADD_FIBERSTATUS"] != 0), "IS_QSO_SELECTED"
    ].any()
    gal = truth[truth["SPECTYPE"] == "GALAXY"]
    assert (
        gal["Z"].between(0, 1.6).all()
        and truth.loc[truth["SPECTYPE"] == "STAR", "Z"].abs().max() < 0.01
    )


def test_every_anomaly_class_in_truth(big_drop):
    _, summary = big_drop
    truth = pd.read_parquet(summary.truth_path)
    anomalous = truth[truth["ANOMALY"] != "none"]
    assert set(anomalous["ANOMALY"]) == set(ANOMALY_KINDS)
    assert (anomalous["SPECTYPE"] == "QSO").all()
    frac = len(anomalous) / (truth["SPECTYPE"] == "QSO").sum()
    assert 0.07 < frac < 0.13
    for _, row in anomalous.iterrows():
        assert json.loads(row["ANOMALY_PARAMS"]), row["ANOMALY"]
    dla = anomalous[anomalous["ANOMALY"] == "dla"]
    params = [json.loads(p) for p in dla["ANOMALY_PARAMS"]]
    assert all(
        20.3 <= p["log_nhi"] <= 21.5 and p["z_abs"] < z
        for p, z in zip(params, dla["Z"], strict=True)
    )


def _quasar(z: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    wave_rest = merged_wavelength() / (1 + z)
    p = draw_qso_params(np.array([z]), rng)
    comp = qso_components(wave_rest[None, :], p)
    return wave_rest, comp, rng


def _mean(wave, flux, lo, hi):
    return flux[(wave >= lo) & (wave <= hi)].mean()


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_injection_changes_spectrum_where_expected(kind):
    z = 2.4
    wave, comp, rng = _quasar(z)
    flux = comp.flux[0]
    parts = {"continuum": comp.continuum[0], "lines": comp.lines[0], "feii": comp.feii[0]}
    fixed = {"bal": {"v_min": 3000.0, "v_max": 12000.0, "depth": 0.8},
             "lobal": {"v_min": 3000.0, "v_max": 12000.0, "depth": 0.8},
             "dla": {"z_abs": 2.2, "log_nhi": 20.8}, "reddened": {"ebv": 0.3},
             "weak_line": {"line_scale": 0.2}, "strong_feii": {"feii_scale": 4.0},
             "arm_seam": {"arm": "R", "scale": 0.8},
             "spikes": {"wave_obs": [5000.0, 8000.0], "amplitude_sigma": 20.0}}[kind]  # fmt: skip
    new, params = inject(kind, wave, flux, rng, z=z, **parts, **fixed)
    assert params == fixed and new.shape == flux.shape
    ratio = new / flux
    if kind in ("bal", "lobal"):  # CIV trough 3000-12000 km/s blueward of 1549 A
        assert _mean(wave, ratio, 1500, 1530) < 0.4 and _mean(wave, ratio, 1600, 1700) > 0.99
    elif kind == "dla":
        core = 1215.67 * (1 + 2.2) / (1 + z)
        assert _mean(wave, new, core - 2, core + 2) < 1e-3 * _mean(wave, flux, core - 2, core + 2)
        assert _mean(wave, ratio, 1600, 1700) > 0.999
    elif kind == "reddened":
        assert _mean(wave, ratio, 1250, 1300) < _mean(wave, ratio, 2200, 2400) < 1
    elif kind == "weak_line":
        civ = _mean(wave, new - parts["continuum"] - parts["feii"], 1530, 1570)
        assert civ == pytest.approx(0.2 * _mean(wave, parts["lines"], 1530, 1570), rel=1e-3)
    elif kind == "strong_feii":
        assert _mean(wave, ratio, 2400, 2600) > 1.1 and _mean(
            wave, ratio, 1700, 1800
        ) == pytest.approx(1)
    elif kind == "arm_seam":
        obs = wave * (1 + z)
        assert np.allclose(ratio[(obs >= 5760) & (obs <= 7620)], 0.8, rtol=1e-5)
        assert np.allclose(ratio[obs < 5760], 1.0) and np.allclose(ratio[obs > 7620], 1.0)
    elif kind == "spikes":
        changed = np.flatnonzero(new != flux)
        assert len(changed) == 2
        assert np.allclose(wave[changed] * (1 + z), [5000.0, 8000.0], atol=0.5)


def test_injection_draws_parameters_when_missing():
    wave, comp, rng = _quasar(2.8, seed=1)
    _, params = inject("dla", wave, comp.flux[0], rng, z=2.8)
    assert 20.3 <= params["log_nhi"] <= 21.5 and 1215.67 * (1 + params["z_abs"]) > 3600
    _, params = inject("bal", wave, comp.flux[0], rng, z=2.8)
    assert 2000 <= params["v_min"] < params["v_max"] <= 25000
    with pytest.raises(ValueError, match="unknown anomaly"):
        inject("nope", wave, comp.flux[0], rng, z=2.8)
