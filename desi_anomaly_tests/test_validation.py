"""Injection-recovery validation: injection at the observed-spectrum level, the PCA baseline, the
recovery metrics, the ADBench export, and the whole chain with a tiny VAE on a coarse grid.

Spectra are synthetic QSOs (``preprocess.synthetic``) and, where ../shared/data is present, real
DESI EDR QSO spectra.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from desi_anomaly.ingest import write_cleaned_shard
from desi_anomaly.io.coadd import read_qso_spectra
from desi_anomaly.io.instrument import ARM_GRIDS
from desi_anomaly.io.redshifts import QSOCatalog
from desi_anomaly.ml import VAEConfig, load_checkpoint, train_vae
from desi_anomaly.mock.anomalies import HIBAL_IONS
from desi_anomaly.mock.quasar import C_KMS
from desi_anomaly.preprocess import PreprocessConfig, RestFrameGrid, preprocess
from desi_anomaly.preprocess.synthetic import synthetic_spectra
from desi_anomaly.validation import (
    METHOD_COLUMNS,
    NO_ANOMALY,
    InjectionError,
    PCABaseline,
    add_qvalues,
    export_adbench,
    fit_detectors,
    inject_and_score,
    inject_spectra,
    read_adbench,
    recovery_table,
    side_by_side,
    take,
)

GRID = RestFrameGrid.for_redshift_range(1.8, 3.2, npix=160)
CONFIG = PreprocessConfig(grid=GRID, compute_features=False, min_coverage_pixels=20)
TINY = VAEConfig(
    npix=160, latent_dim=6, channels=(8, 16, 16), epochs=5, patience=3, batch_size=32, lr=3e-3
)


def spectra(n: int, seed: int, snr=(2.0, 10.0)):
    rng = np.random.default_rng(seed)
    out = synthetic_spectra(
        n, rng, z=rng.uniform(2.2, 3.0, n), snr=rng.uniform(*snr, n), alpha=rng.uniform(-2, -1, n)
    )
    out.meta["TARGETID"] += 10_000 * seed
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def changed_pixels(a, b) -> np.ndarray:
    return np.abs(a.flux - b.flux) > 1e-5 * (1 + np.abs(b.flux))


# ---------------------------------------------------------------------------------- injection
def test_arm_seam_changes_only_its_arm_and_keeps_noise_and_labels():
    base = spectra(4, seed=1)
    out = inject_spectra(base, "arm_seam", np.random.default_rng(0), params={"arm": "R"})
    lo, hi, _ = ARM_GRIDS["R"]
    inside = (base.wave >= lo - 1e-3) & (base.wave <= hi + 1e-3)
    diff = changed_pixels(out, base)
    assert not diff[:, ~inside].any()
    assert diff[:, inside].mean() > 0.9
    assert np.array_equal(out.ivar, base.ivar) and np.array_equal(out.mask, base.mask)
    assert (out.meta["ANOMALY"] == "arm_seam").all()
    assert out.meta["SOURCE_ROW"].tolist() == [0, 1, 2, 3]
    scale = [json.loads(p)["scale"] for p in out.meta["ANOMALY_PARAMS"]]
    assert all(0.7 <= s <= 1.3 and s != 1.0 for s in scale)


def test_spikes_change_exactly_the_spike_pixels():
    base = spectra(3, seed=2)
    out = inject_spectra(base, "spikes", np.random.default_rng(1))
    for j in range(3):
        waves = json.loads(out.meta["ANOMALY_PARAMS"][j])["wave_obs"]
        expected = np.isin(np.round(base.wave, 3), np.round(waves, 3))
        assert np.array_equal(changed_pixels(out, base)[j], expected)
        # amplitude_sigma (>= 10) noise sigmas above the original flux
        assert np.all(out.flux[j, expected] - base.flux[j, expected] > 9 / np.sqrt(base.ivar[j, 0]))


def test_bal_trough_only_blueward_of_its_ions_and_dla_only_blueward_of_lya():
    base = spectra(5, seed=3, snr=(20.0, 20.0))
    bal = inject_spectra(
        base, "bal", np.random.default_rng(2), params={"v_min": 3000, "v_max": 9000, "depth": 0.8}
    )
    rest = base.wave[None, :] / (1 + base.z[:, None])
    trough = np.zeros_like(rest, dtype=bool)
    for line, _ in HIBAL_IONS.values():
        v = C_KMS * (1 - rest / line)
        trough |= (v > 3000 - 4000) & (v < 9000 + 4000)
    diff = changed_pixels(bal, base)
    assert diff.any(axis=1).all() and not (diff & ~trough).any()
    core = np.abs(C_KMS * (1 - rest / 1549.06) - 6000) < 2000
    good = core & (base.ivar > 0) & (base.mask == 0)
    assert np.all((bal.flux[good] - base.flux[good]) < 0)  # absorption lowers the flux

    dla = inject_spectra(base, "dla", np.random.default_rng(3), params={"log_nhi": 20.3})
    z_abs = np.array([json.loads(p)["z_abs"] for p in dla.meta["ANOMALY_PARAMS"]])
    lya_obs = 1215.67 * (1 + z_abs)
    red = base.wave[None, :] > lya_obs[:, None] + 150.0
    rel = np.abs(dla.flux - base.flux) / np.maximum(np.abs(base.flux), 1.0)
    assert rel[red & (base.mask == 0)].max() < 0.02
    near = np.abs(base.wave[None, :] - lya_obs[:, None]) < 3.0
    assert np.all(dla.flux[near & (base.mask == 0)] < base.flux[near & (base.mask == 0)])


def test_inapplicable_spectra_are_not_injected_and_unknown_class_is_refused():
    base = spectra(4, seed=4)
    base.meta["Z"] = [0.5, 2.5, 0.8, 3.0]
    out = inject_spectra(base, "dla", np.random.default_rng(0))
    assert out.meta["SOURCE_ROW"].tolist() == [1, 3]
    with pytest.raises(InjectionError, match="unknown anomaly class"):
        inject_spectra(base, "quasar_jet", np.random.default_rng(0))


# ------------------------------------------------------------------------------ PCA baseline
def test_pca_baseline_scores_strong_injected_anomalies_higher():
    train = preprocess(spectra(150, seed=5), CONFIG)
    pca = PCABaseline(6).fit(train.flux, train.ivar)
    test = spectra(30, seed=6, snr=(15.0, 25.0))
    bal = inject_spectra(
        test, "bal", np.random.default_rng(4), params={"v_min": 2000, "v_max": 12000, "depth": 0.9}
    )
    before, after = preprocess(test, CONFIG), preprocess(bal, CONFIG)
    assert len(before) == len(after) == 30
    s0 = pca.score(before.flux, before.ivar)
    s1 = pca.score(after.flux, after.ivar)
    assert np.mean(s1 > 2 * s0) > 0.9
    # coverage-aware: pixels without data do not change the fit
    flux = before.flux.copy()
    flux[before.ivar == 0] = 1e6
    assert np.allclose(pca.score(flux, before.ivar), s0)


# -------------------------------------------------------------------------- metrics and export
def test_recovery_table_auroc_and_recall_per_bin():
    scored = pd.DataFrame(
        {
            "ANOMALY": ["none"] * 4 + ["bal"] * 2 + ["dla"] * 2,
            "SNR_BIN_VALUE": [1, 1, 8, 8, 1, 8, 8, 8],
            "Z_BIN_VALUE": [2.2] * 8,
            "S": [0.1, 0.2, 0.3, 0.4, 0.15, 0.9, 0.35, 0.05],
            "Q": [0.5, 0.5, 0.5, 0.5, 0.5, 0.001, 0.005, 0.5],
            "P": [0.5, 0.5, 0.5, 0.5, 0.005, 0.001, 0.002, 0.3],
        }
    )
    methods = {"m": ("S", "Q"), "mp": ("S", "Q", "P")}
    table = recovery_table(scored, methods, snr_edges=np.array([0, 5, np.inf]))
    with_p = table[table["METHOD"] == "mp"].set_index(["ANOMALY", "SNR_BIN", "Z_BIN"])
    assert with_p.loc[("bal", "all", "all"), "RECALL_P"] == 1.0
    assert with_p.loc[("dla", "all", "all"), "RECALL_P"] == 0.5
    table = table[table["METHOD"] == "m"]
    assert table["RECALL_P"].isna().all()
    row = table.set_index(["ANOMALY", "SNR_BIN", "Z_BIN"])
    assert row.loc[("bal", "all", "all"), "AUROC"] == pytest.approx(5 / 8)
    assert row.loc[("bal", ">5", "all"), "AUROC"] == 1.0
    assert row.loc[("bal", "0-5", "all"), "AUROC"] == 0.5
    assert row.loc[("dla", "all", "all"), "RECALL"] == 0.5
    assert row.loc[("dla", ">5", "all"), "N_NORMAL"] == 2
    wide = side_by_side(table)
    assert {"AUROC_m", "RECALL_m"} <= set(wide.columns)
    with pytest.raises(InjectionError, match="lacks column"):
        recovery_table(scored.drop(columns="Q"), {"m": ("S", "Q")})


def test_adbench_export_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3)).astype(np.float32)
    kinds = np.array(["none", "bal", "none", "dla", "none", "none", "spikes"])
    path = export_adbench(
        tmp_path / "ir.npz",
        x,
        kinds != NO_ANOMALY,
        scores={"ensemble": rng.random(7), "pca": rng.random(7)},
        anomaly=kinds,
        snr=np.arange(7.0),
    )
    back = read_adbench(path)
    assert np.array_equal(back["X"], x)
    assert back["y"].tolist() == [0, 1, 0, 1, 0, 0, 1]
    assert back["anomaly"].tolist() == kinds.tolist()
    assert set(back) == {"X", "y", "score_ensemble", "score_pca", "anomaly", "snr"}
    with pytest.raises(InjectionError, match="arrays of 7 rows"):
        export_adbench(tmp_path / "bad.npz", x, kinds != "none", scores={"e": np.ones(6)})
    assert not (tmp_path / "bad.npz").exists()


# --------------------------------------------------------------------------- whole chain
@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    """Tiny VAE, ensemble and PCA baseline fitted on synthetic normal spectra."""
    root = tmp_path_factory.mktemp("validation")
    train = preprocess(spectra(280, seed=7), CONFIG)
    train.meta.insert(1, "PARTITION", "main-dark-1")
    shard = write_cleaned_shard(root / "main-dark-1.parquet", train, "main-dark-1", {})
    vae = load_checkpoint(train_vae([shard], root / "vae", TINY))
    reference = preprocess(spectra(150, seed=9), CONFIG)
    calibration = preprocess(spectra(200, seed=8), CONFIG)
    return fit_detectors(
        vae, train, reference, calibration, seed=0, pca_components=6, min_per_stratum=50
    )


def test_injection_recovery_chain_scores_labels_and_qvalues(detectors):
    test = spectra(60, seed=9, snr=(3.0, 30.0))
    kinds = ["bal", "dla", "spikes"]
    scored = inject_and_score(detectors, test, kinds, np.random.default_rng(5), config=CONFIG)
    table = add_qvalues(scored.table)
    assert len(table) == len(scored.latents) and scored.latents.shape[1] == TINY.code_dim
    counts = table["ANOMALY"].value_counts()
    assert counts[NO_ANOMALY] == 60 and all(counts[k] + scored.n_dropped[k] == 60 for k in kinds)
    # each injected row points at its original, whose S/N and z are used for binning
    orig = table[table["ANOMALY"] == NO_ANOMALY].set_index("SOURCE_ROW")
    inj = table[table["ANOMALY"] != NO_ANOMALY]
    assert np.allclose(inj["SNR_BIN_VALUE"], orig.loc[inj["SOURCE_ROW"], "SNR_MEDIAN"])
    assert np.allclose(inj["Z"], orig.loc[inj["SOURCE_ROW"], "Z"])
    for _, p_col, q_col in (("", "P_VALUE", "Q_VALUE"), ("", "PCA_P_VALUE", "PCA_Q_VALUE")):
        assert table[p_col].between(0, 1).all() and (table[q_col] >= table[p_col] - 1e-12).all()
    wide = side_by_side(recovery_table(table, METHOD_COLUMNS))
    overall = wide[(wide["SNR_BIN"] == "all") & (wide["Z_BIN"] == "all")].set_index("ANOMALY")
    assert set(overall.index) == set(kinds)
    # deep BAL troughs at S/N 3-30 are plain to the PCA baseline
    assert overall.loc["bal", "AUROC_pca"] > 0.8


# ----------------------------------------------------------------------------- real spectra
def test_injection_into_real_desi_spectra_goes_through_preprocessing(shared_data):
    edr = shared_data / "desi-edr"
    catalog = QSOCatalog.read(edr / "QSO_cat_fuji_dark_tile.fits.gz")
    real = read_qso_spectra(
        edr / "tile/cumulative/coadd-1-80693-thru20210204.fits", catalog=catalog
    )
    real = take(real, np.flatnonzero(real.z > 2.0))
    params = {"v_min": 3000, "v_max": 9000, "depth": 0.8}
    bal = inject_spectra(real, "bal", np.random.default_rng(0), params=params)
    assert len(bal) == len(real) > 0
    config = PreprocessConfig()
    before, after = preprocess(real, config), preprocess(bal, config)
    assert before.targetid.tolist() == after.targetid.tolist()
    wave = config.grid.centres
    red = wave > 1600.0  # redward of every trough
    trough = (wave > 1549.06 * (1 - 9000 / C_KMS)) & (wave < 1549.06 * (1 - 3000 / C_KMS))
    # normalisation may shift by the trough's effect on the median: compare shapes
    ratio = after.flux / np.where(before.flux != 0, before.flux, 1)
    norm = after.meta["NORM"].to_numpy() / before.meta["NORM"].to_numpy()
    good = (before.ivar > 0) & (after.ivar > 0)
    for j in range(len(before)):
        r = ratio[j] * norm[j]
        assert np.allclose(r[good[j] & red], 1.0, atol=1e-3)
        assert np.median(after.flux[j][good[j] & trough] * norm[j]) < np.median(
            before.flux[j][good[j] & trough]
        )
