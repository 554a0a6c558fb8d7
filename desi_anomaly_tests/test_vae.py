"""The spectral VAE: model, loss, resumable training, checkpoints and encoding, on small shards.

Shards are real-format cleaned shards (synthetic QSO spectra -> ``preprocess`` -> ``write_shard``)
on a coarse 128-pixel rest-frame grid so that tiny models train in a second.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from desi_anomaly.ingest import write_cleaned_shard
from desi_anomaly.ml import (
    CheckpointError,
    VAEConfig,
    encode_partition,
    encode_shard,
    file_sha256,
    latents_path,
    load_checkpoint,
    read_latents_info,
    reconstruct,
    train_vae,
)
from desi_anomaly.ml.vae import SpectrumVAE, line_pixel_weight, vae_loss
from desi_anomaly.preprocess import PreprocessConfig, RestFrameGrid, preprocess
from desi_anomaly.preprocess.synthetic import synthetic_spectra
from desi_anomaly.shards import read_shard, write_shard

GRID = RestFrameGrid.for_redshift_range(0.5, 3.0, npix=128)
TINY = VAEConfig(
    npix=128, latent_dim=6, channels=(8, 16, 16), epochs=6, patience=3, batch_size=32, lr=3e-3
)


def make_shard(path, key, n, seed, grid=GRID):
    """A cleaned shard of ``n`` synthetic QSOs (varied z, S/N and slope) on ``grid``."""
    rng = np.random.default_rng(seed)
    spectra = synthetic_spectra(
        n, rng, z=rng.uniform(0.5, 3.0, n), snr=rng.uniform(1, 8, n), alpha=rng.uniform(-2, -1, n)
    )
    spectra.meta["TARGETID"] += 10_000 * seed
    spectra.meta.insert(1, "PARTITION", key)
    config = PreprocessConfig(grid=grid, compute_features=False, min_coverage_pixels=20)
    return write_cleaned_shard(path, preprocess(spectra, config), key, {})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, also when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-shards")
    return [
        make_shard(root / f"main-dark-{10 + i}.parquet", f"main-dark-{10 + i}", 70, seed=i)
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A tiny model trained on the first three shards (the fourth is held out)."""
    out = tmp_path_factory.mktemp("vae")
    return train_vae(shards[:3], out, replace(TINY, epochs=20))


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    config = VAEConfig(latent_dim=16, channels=(4, 8), line_weight=3.0)
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown VAE config key"):
        VAEConfig.from_dict({**config.to_dict(), "dropout": 0.1})


def test_model_reconstructs_the_whole_grid_for_any_pixel_count():
    config = VAEConfig(npix=250, latent_dim=5, channels=(4, 8, 8))
    model = SpectrumVAE(config)
    flux, ivar = torch.randn(3, 250), torch.zeros(3, 250)
    ivar[:, 40:120] = 1.0  # partial coverage
    recon, mu, logvar, coef = model(flux, ivar)
    assert recon.shape == (3, 250) and mu.shape == logvar.shape == (3, 5)
    assert coef.shape == (3, config.linear_dim)


def test_linear_coefficients_are_the_weighted_least_squares_map():
    torch.manual_seed(1)
    model = SpectrumVAE(VAEConfig(npix=200, latent_dim=4, linear_dim=3, channels=(4, 8)))
    with torch.no_grad():
        model.eigen.copy_(torch.randn(200, 3))
    base = torch.ones(2, 200, dtype=torch.float64)
    truth = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], dtype=torch.float64)
    flux = base + truth @ model.eigen.detach().double().T
    ivar = torch.full((2, 200), 1e4, dtype=torch.float64)
    ivar[:, :120] = 0.0  # the fit uses only pixels with data
    flux[:, :120] = 1e3
    coef = model.linear_coefficients(flux, ivar, base)
    # the unit prior shrinks the coefficients by about 1 / (1 + 1 / (ivar |e|^2)): ~1e-6 here
    torch.testing.assert_close(coef, truth, rtol=1e-4, atol=1e-4)
    weak = model.linear_coefficients(flux, ivar * 1e-6, base)  # the prior matters at low S/N
    assert (weak.norm(dim=1) < 0.6 * truth.norm(dim=1)).all()
    e, w = model.eigen.detach().double().numpy(), 1e-2 * (ivar[0] > 0).numpy()
    rhs = e.T @ (w * (flux[0] - 1).numpy())
    expected = np.linalg.solve(e.T @ (w[:, None] * e) + np.eye(3), rhs)
    np.testing.assert_allclose(weak[0].detach().numpy(), expected, rtol=1e-6)


def test_loss_ignores_pixels_without_data():
    torch.manual_seed(0)
    model = SpectrumVAE(TINY).eval()
    flux, ivar = torch.rand(4, 128) + 0.5, torch.full((4, 128), 4.0)
    ivar[:, :50] = 0.0
    weight = torch.ones(128)
    changed = flux.clone()
    changed[:, :50] = 1e6
    assert torch.equal(vae_loss(model, flux, ivar, weight), vae_loss(model, changed, ivar, weight))
    assert not torch.equal(
        vae_loss(model, flux, ivar * 2, weight), vae_loss(model, flux, ivar, weight)
    )


def test_line_weight_up_weights_emission_line_windows():
    weight = line_pixel_weight(VAEConfig(npix=GRID.npix, line_weight=4.0), GRID.centres)
    civ = np.argmin(np.abs(GRID.centres - 1549.0))
    continuum = np.argmin(np.abs(GRID.centres - 1350.0))
    assert weight[civ] == 4.0 and weight[continuum] == 1.0


def test_training_lowers_validation_loss_and_beats_the_mean_spectrum(trained, shards):
    vae = load_checkpoint(trained)
    losses = [h["val_loss"] for h in vae.history]
    assert min(losses) < 0.5 * losses[0]
    held = read_shard(shards[3])
    rchi2 = encode_shard(vae, held).column("RECON_RCHI2").to_numpy()
    # Baseline: the ivar-weighted mean spectrum of the training shards.
    train = [read_shard(p) for p in shards[:3]]
    flux = np.concatenate([s.flux for s in train])
    ivar = np.concatenate([s.ivar for s in train])
    mean = (flux * ivar).sum(0) / np.maximum(ivar.sum(0), 1e-30)
    base = ((held.flux - mean) ** 2 * held.ivar).sum(1) / (held.ivar > 0).sum(1)
    assert np.median(rchi2) < 0.5 * np.median(base)


def test_checkpoint_holds_the_extra_variance_measured_after_training(trained):
    vae = load_checkpoint(trained)
    forest = vae.model.forest_pixels(RestFrameGrid.from_dict(vae.grid).centres)
    extra = vae.model.extra_var.numpy()
    # measured, not the prior: with only ~20 validation spectra the forest estimate is shrunk
    # most of the way back to the prior (noise.PRIOR_PIXELS; test_noise checks the estimator),
    # the red side, covered by all of them, has none (the synthetic spectra are the model's kind)
    assert forest.any() and not np.allclose(extra[:, forest], TINY.forest_var)
    assert np.all(extra >= 0) and np.median(extra[:, ~forest]) < 0.01
    # too few validation spectra for redshift bins: one row for every redshift
    assert not np.isfinite(vae.model.extra_var_edges.numpy()).any()


def test_latents_flag_the_spectra_the_vae_trained_on(trained, shards):
    vae = load_checkpoint(trained)
    train_tid = np.concatenate([read_shard(p).meta["TARGETID"].to_numpy() for p in shards[:3]])
    # every training shard spectrum except the validation share (TINY.val_fraction)
    n_val = round(TINY.val_fraction * len(train_tid))
    assert len(vae.trained_targetids) == len(train_tid) - n_val
    assert np.isin(vae.trained_targetids, train_tid).all()
    for path, trained_on in ((shards[0], True), (shards[3], False)):
        table = encode_shard(vae, read_shard(path)).to_pandas()
        expected = np.isin(table["TARGETID"], vae.trained_targetids)
        np.testing.assert_array_equal(table["VAE_TRAINED"], expected)
        assert expected.any() == trained_on


def test_effective_ivar_uses_the_extra_variance_of_each_spectrums_redshift():
    model = SpectrumVAE(TINY)
    rows = np.stack([np.full(128, v) for v in (0.0, 0.1, 0.4)])
    model.set_extra_var(rows, np.array([2.0, 3.0]))
    redshift = torch.tensor([1.0, 2.5, 3.5, 2.0])
    ivar, flux_model = torch.full((4, 128), 4.0), torch.full((4, 128), 2.0)
    eff = model.effective_ivar(ivar, flux_model, redshift)
    expected = 4.0 / (1.0 + 4.0 * torch.tensor([0.0, 0.1, 0.4, 0.1]) * 4.0)
    torch.testing.assert_close(eff[:, 0], expected)
    with pytest.raises(ValueError, match="pass the redshifts"):
        model.effective_ivar(ivar, flux_model)
    with pytest.raises(ValueError, match="increasing edges"):
        model.set_extra_var(rows, np.array([3.0, 2.0]))


def test_checkpoint_holds_everything_needed_to_resume_and_encode(trained, shards):
    saved = torch.load(trained, weights_only=True)
    for key in ("model_state", "best_model_state", "optimizer_state", "rng", "history"):
        assert saved[key]
    assert saved["grid"] == read_shard(shards[0]).info["grid"]
    assert VAEConfig.from_dict(saved["config"]).epochs == 20
    assert saved["finished"] and len(saved["history"]) == saved["epoch"]


def test_interrupted_training_resumes_to_the_uninterrupted_result(shards, tmp_path):
    straight = load_checkpoint(train_vae(shards[:2], tmp_path / "straight", TINY))

    def stop_after_epoch_2(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_vae(shards[:2], tmp_path / "resumed", TINY, progress=stop_after_epoch_2)
    assert torch.load(tmp_path / "resumed" / "vae_checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = load_checkpoint(train_vae(shards[:2], tmp_path / "resumed", TINY))

    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    for name, weights in straight.model.state_dict().items():
        assert torch.equal(weights, resumed.model.state_dict()[name]), name


def test_finished_checkpoint_is_returned_unchanged(trained, shards):
    before = file_sha256(trained)
    assert train_vae(shards[:3], trained.parent, replace(TINY, epochs=20))
    assert file_sha256(trained) == before


def test_resume_with_another_config_is_refused(trained, shards):
    with pytest.raises(CheckpointError, match="cannot resume: its config differs"):
        train_vae(shards[:3], trained.parent, TINY)


def test_checkpoint_of_another_grid_is_refused_naming_the_file(trained, tmp_path):
    other = RestFrameGrid.for_redshift_range(0.0, 7.0, npix=128)
    with pytest.raises(CheckpointError, match=r"vae_checkpoint\.pt.*rest-frame grid"):
        load_checkpoint(trained, grid=other.to_dict())
    shard = read_shard(make_shard(tmp_path / "main-dark-99.parquet", "main-dark-99", 10, 9, other))
    with pytest.raises(CheckpointError, match=r"vae_checkpoint\.pt.*main-dark-99"):
        encode_shard(load_checkpoint(trained), shard)


def test_unreadable_checkpoint_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"broken\.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_an_older_format_is_retrained_not_resumed(trained, shards, tmp_path):
    old = torch.load(trained, weights_only=True)
    old["format_version"] -= 1
    path = tmp_path / "vae" / trained.name
    path.parent.mkdir()
    torch.save(old, path)
    with pytest.raises(CheckpointError, match=r"format version .* retrain"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match=r"older version .* training anew"):
        train_vae(shards[:2], path.parent, TINY)
    assert load_checkpoint(path).history[-1]["epoch"] == len(load_checkpoint(path).history)


def test_encoding_writes_latents_with_provenance_and_skips_done_partitions(
    trained, shards, tmp_path
):
    vae = load_checkpoint(trained)
    result = encode_partition(vae, shards[3], tmp_path)
    assert result.ok and not result.skipped and result.n_spectra == len(read_shard(shards[3]))
    path = latents_path(tmp_path, "main-dark-13")
    table = pq.read_table(path)
    assert table.schema.field("LATENT").type.list_size == TINY.code_dim
    assert str(table.schema.field("LATENT").type.value_type) == "float"
    assert set(table.column("PARTITION").to_pylist()) == {"main-dark-13"}
    rchi2 = table.column("RECON_RCHI2").to_numpy()
    expected = table.column("RECON_CHI2").to_numpy() / table.column("N_GOOD").to_numpy()
    np.testing.assert_allclose(rchi2, expected)
    info = read_latents_info(path)
    assert info["checkpoint_sha256"] == file_sha256(trained) and info["partition"] == "main-dark-13"
    assert encode_partition(vae, shards[3], tmp_path).skipped


def test_a_different_checkpoint_re_encodes(trained, shards, tmp_path):
    vae = load_checkpoint(trained)
    encode_partition(vae, shards[3], tmp_path)
    vae.sha256 = "0" * 64  # as if the checkpoint had been retrained
    assert not encode_partition(vae, shards[3], tmp_path).skipped


def test_reconstruct_returns_the_arrays_behind_the_chi2(trained, shards):
    vae = load_checkpoint(trained)
    shard = read_shard(shards[3])
    table = encode_shard(vae, shard).to_pandas()
    picked = table["TARGETID"].to_numpy()[[5, 2]]
    rec = reconstruct(vae, shard, picked)
    assert sorted(rec.targetid) == sorted(picked) and rec.model.shape == (2, TINY.npix)
    chi2 = (rec.residual**2).sum(1)
    expected = table.set_index("TARGETID").loc[rec.targetid, "RECON_CHI2"].to_numpy()
    np.testing.assert_allclose(chi2, expected, rtol=1e-4)


def test_empty_shard_gives_an_empty_latents_file(trained, tmp_path):
    shard_path = write_shard(
        tmp_path / "main-dark-5.parquet",
        flux=np.zeros((0, 128), np.float32),
        ivar=np.zeros((0, 128), np.float32),
        coverage=np.zeros((0, 128), bool),
        meta=pd.DataFrame({"TARGETID": np.array([], np.int64)}),
        info={"partition": "main-dark-5", "grid": GRID.to_dict()},
    )
    result = encode_partition(load_checkpoint(trained), shard_path, tmp_path / "out")
    assert result.ok and result.n_spectra == 0
    table = pq.read_table(result.latents)
    assert table.num_rows == 0 and table.schema.field("LATENT").type.list_size == TINY.code_dim


def test_non_finite_pixels_are_masked_not_propagated(trained, shards):
    vae = load_checkpoint(trained)
    shard = read_shard(shards[3])
    flux, ivar = shard.flux.copy(), shard.ivar.copy()
    row = int(np.argmax((ivar > 0).sum(1)))
    good = np.flatnonzero(ivar[row] > 0)
    flux[row, good[:5]] = np.nan
    ivar[row, good[5:8]] = np.inf
    broken = type(shard)(flux, ivar, shard.coverage, shard.meta, shard.info)
    clean = encode_shard(vae, shard).to_pandas()
    masked = encode_shard(vae, broken).to_pandas()
    assert masked["N_GOOD"][row] == clean["N_GOOD"][row] - 8
    assert np.isfinite(masked["RECON_CHI2"][row])
    assert np.isfinite(np.stack(masked["LATENT"])).all()


def test_fewer_spectra_than_a_batch(shards, tmp_path):
    few = make_shard(tmp_path / "main-dark-7.parquet", "main-dark-7", 5, seed=7)
    config = replace(TINY, batch_size=256, epochs=2)
    vae = load_checkpoint(train_vae([few], tmp_path / "vae", config))
    table = encode_shard(vae, read_shard(few), batch_size=256)
    assert table.num_rows == len(read_shard(few)) > 0


def test_learning_rate_decays_from_lr_to_its_final_fraction():
    from desi_anomaly.ml.training import learning_rate

    config = VAEConfig(lr=2e-3, lr_final_fraction=0.05, epochs=10)
    rates = [learning_rate(config, epoch) for epoch in range(12)]
    assert rates[0] == pytest.approx(2e-3) and rates[10] == pytest.approx(1e-4) == rates[11]
    assert all(a > b for a, b in itertools.pairwise(rates[:11]))


def test_forest_dip_measures_absorbers_in_the_dla_search_window_only(trained, shards):
    """Removing the flux of three forest pixels raises FOREST_DIP between Lyman-beta and
    Lyman-alpha, not in the Lyman-beta forest below (nor RESID_DIP, the red side's)."""
    vae = load_checkpoint(trained)
    shard = read_shard(shards[3])
    wave = GRID.centres
    forest = (wave > 930.0) & (wave < 1200.0)
    rows = np.flatnonzero((shard.ivar[:, forest] > 0).all(axis=1))
    assert len(rows) >= 3
    shard = replace(
        shard,
        flux=shard.flux[rows],
        ivar=shard.ivar[rows],
        coverage=shard.coverage[rows],
        meta=shard.meta.iloc[rows].reset_index(drop=True),
    )
    before = encode_shard(vae, shard).to_pandas()
    for pixels, raised in (
        ((wave > 1090) & (wave < 1130), True),
        ((wave > 940) & (wave < 990), False),
    ):
        flux = shard.flux.copy()
        flux[:, pixels] = 0.0
        after = encode_shard(vae, replace(shard, flux=flux)).to_pandas()
        gain = after["FOREST_DIP"] - before["FOREST_DIP"]
        assert (gain > 3.0).all() if raised else (np.abs(gain) < 1.0).all(), gain.to_numpy()
        np.testing.assert_allclose(after["RESID_DIP"], before["RESID_DIP"], atol=1.0)
