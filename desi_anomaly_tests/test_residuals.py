"""Local residual statistics: the box-filter scan finds absorption and emission features."""

from __future__ import annotations

import numpy as np

from desi_anomaly.ml.residuals import (
    LYA,
    LYB,
    PEAK_WINDOW_KMS,
    TROUGH_WINDOW_KMS,
    dla_search_pixels,
    strongest_dip,
    strongest_peak,
    window_widths,
)


def test_window_widths_follow_the_pixel_velocity():
    assert window_widths(100.0, PEAK_WINDOW_KMS) == (1, 10, 30, 100)
    assert window_widths(1000.0, PEAK_WINDOW_KMS) == (1, 3, 10)  # 0 and 1,000 km/s: one pixel
    assert window_widths(10.0, PEAK_WINDOW_KMS)[0] == 1
    # absorption windows start at a BAL trough's minimum width, 2,000 km/s
    assert window_widths(100.0, TROUGH_WINDOW_KMS) == (20, 30, 100)
    assert window_widths(924.0, TROUGH_WINDOW_KMS) == (2, 3, 11)


def test_a_trough_raises_dip_by_its_matched_filter_significance():
    rng = np.random.default_rng(0)
    pull = rng.standard_normal((200, 2000))
    good = np.ones_like(pull, dtype=bool)
    troughs, peaks = window_widths(100.0, TROUGH_WINDOW_KMS), window_widths(100.0, PEAK_WINDOW_KMS)
    dip0, peak0 = strongest_dip(pull, good, troughs), strongest_peak(pull, good, peaks)
    assert 2.0 < np.median(dip0) < 5.0 and 2.5 < np.median(peak0) < 5.0  # noise maxima
    trough = pull.copy()
    trough[:, 500:530] -= 2.0  # 30-pixel trough 2 sigma deep per pixel: 2 sqrt(30) ~ 11 sigma
    dip = strongest_dip(trough, good, troughs)
    assert np.all(np.abs(dip - 2.0 * np.sqrt(30)) < 3.0)
    np.testing.assert_allclose(strongest_peak(trough, good, peaks), peak0, atol=1.5)


def test_masked_pixels_are_ignored_and_spikes_found():
    pull = np.zeros((3, 300))
    good = np.ones_like(pull, dtype=bool)
    pull[0, 100] = 40.0  # a spike: single-pixel window
    pull[1, 100:200] = -1e6  # no data there: must not count
    good[1, 100:200] = False
    pull[2, 150] = -40.0  # a one-pixel dip: diluted by the narrowest absorption window
    assert strongest_peak(pull, good, (1, 10, 30))[0] == 40.0
    np.testing.assert_array_equal(strongest_dip(pull, good, (10, 30)), [0.0, 0.0, 40 / np.sqrt(10)])
    assert strongest_peak(pull, good, (1, 10, 30))[1] == 0.0
    none_good = np.zeros_like(good)
    assert np.all(strongest_dip(pull, none_good, (1, 10)) == 0.0)
    assert np.all(strongest_peak(pull, none_good, (1, 10)) == 0.0)


def test_the_dla_search_window_runs_from_lyman_beta_to_3000_kms_below_lyman_alpha():
    wave = np.array([900.0, 1020.0, 1030.0, 1150.0, 1200.0, 1205.0, 1210.0, 1300.0])
    np.testing.assert_array_equal(
        dla_search_pixels(wave), [False, False, True, True, True, False, False, False]
    )
    edge = LYA * (1 - 3000.0 / 299_792.458)  # 1203.5 A
    assert dla_search_pixels(np.array([edge - 0.01]))[0] and not dla_search_pixels(np.array([edge]))
    assert not dla_search_pixels(np.array([LYB]))[0]
