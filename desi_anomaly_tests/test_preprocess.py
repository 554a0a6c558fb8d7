"""Preprocessing: rest grid, sky lines, flux-conserving resampling, normalisation, quality cuts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from desi_anomaly.preprocess import (
    DROP_REASONS,
    PreprocessConfig,
    PreprocessError,
    RestFrameGrid,
    preprocess,
    resample_to_rest,
    sky_line_mask,
)
from desi_anomaly.preprocess.normalise import masked_median
from desi_anomaly.preprocess.resample import pixel_edges
from desi_anomaly.preprocess.skylines import SKY_LINES_VACUUM, air_to_vacuum
from desi_anomaly.preprocess.synthetic import desi_wave, synthetic_spectra
from desi_anomaly.spectra import ObservedSpectra


def slow_resample(wave, flux, ivar, good, z, grid, min_good_fraction=0.5):
    """Reference resampling: explicit overlaps of every input pixel with every output bin."""
    e = pixel_edges(wave)
    n, k = len(z), grid.npix
    out_f, out_iv, cov = np.zeros((n, k)), np.zeros((n, k)), np.zeros((n, k), bool)
    for i in range(n):
        for j in range(k):
            a, b = grid.edges[j] * (1 + z[i]), grid.edges[j + 1] * (1 + z[i])
            cov[i, j] = a >= e[0] and b <= e[-1]
            ov = np.clip(np.minimum(b, e[1:]) - np.maximum(a, e[:-1]), 0, None) * good[i]
            sw = ov.sum()
            if sw < min_good_fraction * (b - a) or sw == 0:
                continue
            use = ov > 0
            out_f[i, j] = (ov * flux[i])[use].sum() / sw * (1 + z[i])
            var = (ov[use] ** 2 / ivar[i, use]).sum() / sw**2 * (1 + z[i]) ** 2
            out_iv[i, j] = 1 / var
    return out_f, out_iv, cov


def random_batch(rng, n, m, uniform):
    step = np.full(m, 0.8) if uniform else rng.uniform(0.3, 1.5, m)
    wave = 4000.0 + np.cumsum(step)
    flux = rng.normal(5.0, 2.0, (n, m)).astype(np.float32)
    ivar = rng.uniform(0.1, 4.0, (n, m)).astype(np.float32)
    good = rng.random((n, m)) > 0.15
    good[0, 30:60] = False  # a long masked stretch: some bins lose more than half their pixels
    return wave, flux, ivar, good


# --- grid -------------------------------------------------------------------------------------


def test_grid_spans_rest_range_of_redshift_span_and_is_log_uniform():
    grid = RestFrameGrid.for_redshift_range(0.0, 7.0, npix=4000)
    assert grid.wave_min == pytest.approx(3600.0 / 8.0)
    assert grid.wave_max == pytest.approx(9824.0)
    assert grid.edges.shape == (4001,) and grid.centres.shape == (4000,)
    assert grid.edges[0] == grid.wave_min and grid.edges[-1] == grid.wave_max
    np.testing.assert_allclose(np.diff(np.log(grid.centres)), grid.dloglam, rtol=1e-9)
    assert np.all((grid.centres > grid.edges[:-1]) & (grid.centres < grid.edges[1:]))
    assert grid.velocity_per_pixel == pytest.approx(299792.458 * np.log(9824 / 450) / 4000)


def test_grid_equality_hash_and_dict_round_trip():
    a = RestFrameGrid.for_redshift_range(0.5, 3.0, npix=1000)
    b = RestFrameGrid.from_dict(json.loads(json.dumps(a.to_dict())))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != RestFrameGrid(a.wave_min, a.wave_max, 1001)
    with pytest.raises(ValueError):
        RestFrameGrid(100.0, 50.0, 10)
    with pytest.raises(ValueError):
        RestFrameGrid(100.0, 500.0, 1)
    with pytest.raises(ValueError):
        RestFrameGrid.from_dict({"kind": "linear", "wave_min": 1, "wave_max": 2, "npix": 3})


def test_grid_arrays_are_read_only():
    grid = RestFrameGrid(1000.0, 2000.0, 10)
    with pytest.raises(ValueError):
        grid.centres[0] = 0.0


# --- sky lines --------------------------------------------------------------------------------


def test_sky_lines_are_vacuum_and_masked_within_half_width():
    assert air_to_vacuum(5577.34) == pytest.approx(5578.89, abs=0.03)
    assert np.all(np.diff(SKY_LINES_VACUUM) > 0)
    wave = desi_wave()
    mask = sky_line_mask(wave, half_width=2.5)
    line = air_to_vacuum(5577.34)
    assert mask[np.abs(wave - line) <= 2.4].all()
    assert not mask[np.abs(wave - line).argmin() + 10]  # 8 A away
    assert not mask[(wave > 4000) & (wave < 5500)].any()  # no strong sky line there
    assert 0.005 < mask.mean() < 0.06


# --- resampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("uniform", [True, False])
def test_resampling_matches_slow_reference(uniform):
    rng = np.random.default_rng(1 if uniform else 2)
    wave, flux, ivar, good = random_batch(rng, 5, 150, uniform)
    z = rng.uniform(0.0, 0.5, 5)
    # Rest grid wider than the observed range: partly covered bins at both ends.
    grid = RestFrameGrid(wave[0] / 1.55, wave[-1] * 1.02, 600)
    fast = resample_to_rest(wave, flux, ivar, good, z, grid, block_rows=2)
    ref_f, ref_iv, ref_cov = slow_resample(wave, flux, ivar, good, z, grid)
    np.testing.assert_array_equal(fast.coverage, ref_cov)
    np.testing.assert_array_equal(fast.ivar > 0, ref_iv > 0)
    np.testing.assert_allclose(fast.flux, ref_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast.ivar, ref_iv, rtol=1e-4)
    assert (ref_iv > 0).sum() > 100 and (~ref_cov).any() and (ref_cov & (ref_iv == 0)).any()
    subset = resample_to_rest(wave, flux, ivar, good, z, grid, rows=np.array([4, 1]))
    np.testing.assert_array_equal(subset.flux, fast.flux[[4, 1]])
    np.testing.assert_array_equal(subset.ivar, fast.ivar[[4, 1]])
    with pytest.raises(ValueError):
        resample_to_rest(wave, flux, ivar[:, 1:], good, z, grid)


def test_resampling_conserves_flux_integral():
    wave = desi_wave()
    z = np.array([0.4, 1.7, 3.1])
    e = pixel_edges(wave)

    def integral(lo, hi):  # of f(lambda) = 2 + sin(lambda / 150)
        return 2 * (hi - lo) - 150 * (np.cos(hi / 150) - np.cos(lo / 150))

    pixel_mean = integral(e[:-1], e[1:]) / np.diff(e)
    flux = np.tile(pixel_mean, (3, 1)).astype(np.float32)
    good = np.ones(flux.shape, bool)
    grid = RestFrameGrid.for_redshift_range(0.0, 7.0)
    rest = resample_to_rest(wave, flux, np.ones_like(flux), good, z, grid)
    for i in range(3):
        use = rest.coverage[i]
        lo, hi = grid.edges[:-1][use][0], grid.edges[1:][use][-1]
        assert rest.ivar[i, use].min() > 0
        total = np.sum(rest.flux[i, use] * grid.widths[use])  # rest frame
        expected = integral(lo * (1 + z[i]), hi * (1 + z[i]))  # observed frame: same energy
        assert total == pytest.approx(expected, rel=1e-5)


def test_resampled_ivar_matches_monte_carlo_scatter():
    rng = np.random.default_rng(3)
    m, n = 400, 4000
    wave = 5000.0 + 0.8 * np.arange(m)
    sigma = rng.uniform(0.5, 3.0, m)
    flux = (rng.normal(size=(n, m)) * sigma).astype(np.float32)
    ivar = np.tile(1 / sigma**2, (n, 1)).astype(np.float32)
    good = np.tile(rng.random(m) > 0.1, (n, 1))
    grid = RestFrameGrid(wave[0] / 1.3, wave[-1] / 1.3, 60)
    rest = resample_to_rest(wave, flux, ivar, good, np.full(n, 0.3), grid)
    ok = rest.ivar[0] > 0
    assert ok.sum() > 40
    np.testing.assert_array_equal(rest.ivar, np.tile(rest.ivar[0], (n, 1)))
    ratio = rest.flux[:, ok].std(axis=0) * np.sqrt(rest.ivar[0, ok])
    assert np.all(np.abs(ratio - 1) < 0.06)  # 4000 draws: std error ~1.1%
    assert abs(ratio.mean() - 1) < 0.01


def test_masked_pixels_do_not_leak_into_the_output():
    rng = np.random.default_rng(4)
    wave, flux, ivar, good = random_batch(rng, 3, 200, True)
    grid = RestFrameGrid(wave[0], wave[-1], 50)
    z = np.zeros(3)
    before = resample_to_rest(wave, flux, ivar, good, z, grid)
    corrupted, civ = flux.copy(), ivar.copy()
    corrupted[~good] = np.float32(1e30)
    civ[~good] = np.nan
    after = resample_to_rest(wave, corrupted, civ, good, z, grid)
    np.testing.assert_array_equal(after.flux, before.flux)
    np.testing.assert_array_equal(after.ivar, before.ivar)
    # Bins whose pixels are all masked have no data.
    good[:, 80:120] = False
    gap = resample_to_rest(wave, corrupted, civ, good, z, grid)
    inside = (grid.edges[:-1] > wave[81]) & (grid.edges[1:] < wave[118])
    assert inside.any() and np.all(gap.ivar[:, inside] == 0) and np.all(gap.flux[:, inside] == 0)


def test_resampling_deredshifts_flux_density():
    wave = desi_wave()
    rng = np.random.default_rng(9)
    flux = rng.uniform(1, 2, (2, len(wave))).astype(np.float32)
    ivar = rng.uniform(1, 2, (2, len(wave))).astype(np.float32)
    good, z = np.ones(flux.shape, bool), np.array([0.0, 2.0])
    grid = RestFrameGrid.for_redshift_range(0.0, 3.0, npix=800)
    rest = resample_to_rest(wave, flux, ivar, good, z, grid)
    raw = resample_to_rest(wave, flux, ivar, good, z, grid, deredshift_flux=False)
    np.testing.assert_allclose(rest.flux, raw.flux * (1 + z[:, None]), rtol=1e-6)
    np.testing.assert_allclose(rest.ivar, raw.ivar / (1 + z[:, None]) ** 2, rtol=1e-6)
    # Rest-frame coverage of z = 2 is the observed range divided by 3.
    covered = grid.centres[rest.coverage[1]]
    one_pixel = 1.5 * grid.velocity_per_pixel / 299792.458  # relative
    assert covered[0] / (wave[0] / 3) == pytest.approx(1, abs=one_pixel)
    assert covered[-1] / (wave[-1] / 3) == pytest.approx(1, abs=one_pixel)


# --- normalisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad_fraction", [0.02, 0.7])
def test_masked_median_matches_numpy(bad_fraction):
    rng = np.random.default_rng(5)
    values = rng.normal(size=(40, 301)).astype(np.float32)
    good = rng.random(values.shape) > bad_fraction * rng.random((40, 1)) * 2
    good[3] = False
    good[4] = False
    good[4, 7] = True
    expected = [np.median(v[g]) if g.any() else np.nan for v, g in zip(values, good, strict=True)]
    np.testing.assert_allclose(masked_median(values, good), expected, rtol=1e-6)


# --- the preprocess() entry point -------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    return synthetic_spectra(60, np.random.default_rng(6), snr=rng_snr(60))


def rng_snr(n):
    return np.random.default_rng(7).lognormal(1.0, 0.7, n)


def test_preprocess_outputs_are_clean_and_normalised(batch):
    cleaned = preprocess(batch)
    n, npix = len(cleaned), cleaned.grid.npix
    assert n == len(batch) - len(cleaned.dropped) and n > 50
    assert cleaned.flux.shape == cleaned.ivar.shape == cleaned.coverage.shape == (n, npix)
    assert cleaned.flux.dtype == cleaned.ivar.dtype == np.float32
    assert np.isfinite(cleaned.flux).all() and np.isfinite(cleaned.ivar).all()
    assert (cleaned.ivar >= 0).all() and np.all(cleaned.flux[cleaned.ivar == 0] == 0)
    # Outside the observed range only the (at least half covered) end bins can hold data.
    assert np.all(((cleaned.ivar > 0) & ~cleaned.coverage).sum(axis=1) <= 2)
    assert np.all(cleaned.coverage.sum(axis=1) > 1200)
    med = masked_median(cleaned.flux, cleaned.ivar > 0)
    np.testing.assert_allclose(med, 1.0, rtol=1e-5)
    for col in ("NORM", "SNR_MEDIAN", "MASKED_FRAC", "ZERO_IVAR_FRAC", "EW_CIV", "BAL_FLAG"):
        assert col in cleaned.meta.columns
    assert (cleaned.meta["NORM"] > 0).all()
    assert cleaned.meta["MASKED_FRAC"].between(0.001, 0.01).all()
    np.testing.assert_array_equal(cleaned.meta.columns[:2], ["TARGETID", "Z"])


def test_preprocess_is_row_independent(batch):
    whole = preprocess(batch)
    half = len(batch) // 2
    parts = [
        preprocess(
            ObservedSpectra(
                batch.wave,
                batch.flux[s],
                batch.ivar[s],
                batch.mask[s],
                batch.meta.iloc[s].reset_index(drop=True),
            )
        )
        for s in (slice(0, half), slice(half, None))
    ]
    np.testing.assert_array_equal(whole.flux, np.concatenate([p.flux for p in parts]))
    np.testing.assert_array_equal(whole.ivar, np.concatenate([p.ivar for p in parts]))
    pd.testing.assert_frame_equal(whole.meta, pd.concat([p.meta for p in parts], ignore_index=True))


def flat_spectra(snr: np.ndarray, seed: int = 8) -> ObservedSpectra:
    """Flat spectra (flux 1) with per-pixel S/N ``snr``, z = 1."""
    rng = np.random.default_rng(seed)
    wave = desi_wave()
    n = len(snr)
    flux = (1 + rng.normal(size=(n, len(wave))) / snr[:, None]).astype(np.float32)
    ivar = np.tile(snr[:, None] ** 2, (1, len(wave))).astype(np.float32)
    meta = pd.DataFrame({"TARGETID": np.arange(n) + 10, "Z": np.ones(n), "ZWARN": np.zeros(n, int)})
    return ObservedSpectra(wave, flux, ivar, np.zeros(flux.shape, np.uint32), meta)


def test_every_spectrum_is_kept_or_dropped_with_its_first_failing_reason():
    spectra = flat_spectra(np.full(9, 5.0))
    meta, mask = spectra.meta, spectra.mask
    meta.loc[0, "Z"] = np.nan  # no_redshift
    meta.loc[1, "Z"] = -0.5  # no_redshift
    meta.loc[2, "Z"] = 8.0  # z_out_of_grid
    meta.loc[3, "ZWARN"] = 4  # bad_zwarn
    mask[4, :5000] = 8  # high_masked_fraction
    spectra.ivar[5, :4500] = 0  # high_masked_fraction through zero ivar
    spectra.flux[5, :4500] = np.nan
    spectra.flux[6] -= 1.0  # pure noise: low_snr
    meta.loc[7, "Z"] = np.nan  # fails both no_redshift and high_masked_fraction: first wins
    mask[7] = 1
    cleaned = preprocess(spectra)
    reasons = dict(zip(cleaned.dropped["TARGETID"] - 10, cleaned.dropped["REASON"], strict=True))
    assert reasons == {
        0: "no_redshift", 1: "no_redshift", 2: "z_out_of_grid", 3: "bad_zwarn",
        4: "high_masked_fraction", 5: "high_masked_fraction", 6: "low_snr", 7: "no_redshift",
    }  # fmt: skip
    assert list(cleaned.meta["TARGETID"]) == [18]
    counts = cleaned.drop_counts()
    assert list(counts) == list(DROP_REASONS)
    assert counts["no_redshift"] == 3 and sum(counts.values()) == 8
    assert cleaned.meta.loc[0, "ZERO_IVAR_FRAC"] == 0
    # ZWARN is only a reason when asked for.
    relaxed = preprocess(spectra, PreprocessConfig(drop_nonzero_zwarn=False))
    assert 13 in set(relaxed.meta["TARGETID"])


def test_drop_reasons_after_resampling():
    spectra = flat_spectra(np.full(3, 5.0))
    spectra.mask[0, 500:] = 1  # only ~500 observed pixels: ~80 rest pixels
    spectra.flux[1] = -np.abs(spectra.flux[1])  # negative median flux
    config = PreprocessConfig(max_masked_fraction=0.95, min_snr=-np.inf)
    cleaned = preprocess(spectra, config)
    assert list(cleaned.dropped["REASON"]) == ["too_few_good_pixels", "bad_norm"]
    assert cleaned.meta["N_GOOD_PIXELS"].iloc[0] >= config.min_coverage_pixels


def test_default_snr_cut_keeps_dr1_like_faint_spectra():
    # DR1's 1% quantile of the median per-pixel S/N is 0.31: such spectra must be kept.
    cleaned = preprocess(flat_spectra(np.array([0.31, 0.5, 1.0, 0.05])))
    assert list(cleaned.dropped["TARGETID"]) == [13]
    assert list(cleaned.dropped["REASON"]) == ["low_snr"]
    np.testing.assert_allclose(cleaned.meta["SNR_MEDIAN"], [0.31, 0.5, 1.0], rtol=0.1)


def test_sky_line_masking_option():
    spectra = flat_spectra(np.full(2, 10.0))
    line = air_to_vacuum(5577.34)
    spike = np.abs(spectra.wave - line) < 1.5
    spectra.flux[:, spike] = 50.0  # a bright sky residual
    rest_line = line / 2.0  # z = 1
    masked = preprocess(spectra)
    unmasked = preprocess(spectra, PreprocessConfig(mask_sky_lines=False))
    pix = masked.grid.pixel_range(rest_line - 2, rest_line + 2)
    assert np.all(np.abs(masked.flux[:, pix][masked.ivar[:, pix] > 0] - 1) < 0.3)
    assert unmasked.flux[:, pix].max() > 5


def test_config_round_trip_and_input_errors():
    config = PreprocessConfig(min_snr=0.1, grid=RestFrameGrid(800.0, 3000.0, 500))
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    spectra = flat_spectra(np.full(2, 5.0))
    with pytest.raises(PreprocessError, match="Z"):
        preprocess(
            ObservedSpectra(
                spectra.wave, spectra.flux, spectra.ivar, spectra.mask, spectra.meta[["TARGETID"]]
            )
        )
    empty = preprocess(
        ObservedSpectra(
            spectra.wave, spectra.flux[:0], spectra.ivar[:0], spectra.mask[:0], spectra.meta[:0]
        )
    )
    assert len(empty) == 0 and empty.flux.shape == (0, config.grid.npix * 0 + 4000)
    assert sum(empty.drop_counts().values()) == 0


def test_rerun_on_preprocessed_meta_does_not_duplicate_columns():
    first = preprocess(flat_spectra(np.full(2, 5.0)))
    spectra = flat_spectra(np.full(2, 5.0))
    spectra.meta = first.meta.copy()
    again = preprocess(spectra)
    assert not again.meta.columns.duplicated().any()
    assert list(again.meta.columns) == list(first.meta.columns)


def test_real_desi_qso_spectra(shared_data):
    """Ten real DESI EDR QSOs (z 2.0-4.3): all kept, plausible normalisation and line features."""
    coadd = pytest.importorskip("desi_anomaly.io.coadd")
    redshifts = pytest.importorskip("desi_anomaly.io.redshifts")
    catalog = redshifts.QSOCatalog.read(shared_data / "desi-edr" / "QSO_cat_fuji_dark_tile.fits.gz")
    paths = sorted((shared_data / "desi-edr" / "tile" / "cumulative").glob("coadd-*.fits"))
    assert paths
    for path in paths:
        spectra = coadd.read_qso_spectra(path, catalog=catalog)
        cleaned = preprocess(spectra)
        assert len(cleaned) == len(spectra) == 5 and len(cleaned.dropped) == 0
        meta = cleaned.meta
        assert (meta["NORM"] > 0).all() and (meta["SNR_MEDIAN"] > 0.3).all()
        assert meta["EW_CIV"].between(5, 300).all()  # C IV is observed at every z here
        assert meta["FWHM_CIV"].between(1000, 12000).all()
        assert meta["ALPHA_CONT"].between(-4, 1).all()
        med = masked_median(cleaned.flux, cleaned.ivar > 0)
        np.testing.assert_allclose(med, 1.0, rtol=1e-5)
