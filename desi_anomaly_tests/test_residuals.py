"""Local residual statistics: the box-filter scan finds absorption and emission features."""

from __future__ import annotations

import numpy as np

from desi_anomaly.ml.residuals import WINDOW_KMS, local_extremes, window_widths


def test_window_widths_follow_the_pixel_velocity():
    assert window_widths(100.0) == (1, 10, 30, 100)
    assert window_widths(1000.0) == (1, 3, 10)  # 0 and 1,000 km/s are both one pixel
    assert len(window_widths(10.0)) == len(WINDOW_KMS)


def test_a_trough_raises_dip_by_its_matched_filter_significance():
    rng = np.random.default_rng(0)
    pull = rng.standard_normal((200, 2000))
    good = np.ones_like(pull, dtype=bool)
    widths = window_widths(100.0)
    dip0, peak0 = local_extremes(pull, good, widths)
    assert 2.5 < np.median(dip0) < 5.0 and 2.5 < np.median(peak0) < 5.0  # noise maxima
    trough = pull.copy()
    trough[:, 500:530] -= 2.0  # 30-pixel trough 2 sigma deep per pixel: 2 sqrt(30) ~ 11 sigma
    dip, peak = local_extremes(trough, good, widths)
    assert np.all(np.abs(dip - 2.0 * np.sqrt(30)) < 3.0)
    np.testing.assert_allclose(peak, peak0, atol=1.5)


def test_masked_pixels_are_ignored_and_spikes_found():
    pull = np.zeros((2, 300))
    good = np.ones_like(pull, dtype=bool)
    pull[0, 100] = 40.0  # a spike: single-pixel window
    pull[1, 100:200] = -1e6  # no data there: must not count
    good[1, 100:200] = False
    dip, peak = local_extremes(pull, good, (1, 10, 30))
    assert peak[0] == 40.0 and dip[0] == 0.0
    assert dip[1] == 0.0 and peak[1] == 0.0
    none_good = local_extremes(pull, np.zeros_like(good), (1, 10))
    assert np.all(none_good[0] == 0.0) and np.all(none_good[1] == 0.0)
