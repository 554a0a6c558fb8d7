"""AnomalyEnsemble on synthetic VAE latents: ranking, rank normalisation, streaming, persistence."""

from __future__ import annotations

import itertools
import json

import joblib
import numpy as np
import pytest
from scipy.stats import norm, spearmanr
from sklearn.metrics import roc_auc_score

from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.ml.detectors import (
    SCORE_COLUMNS,
    STAT_COLUMNS,
    AnomalyEnsemble,
    AnomalyInputError,
    EnsembleConfig,
    ModelFileError,
    SyntheticLatents,
    synthetic_latents,
)
from desi_anomaly.ml.residuals import RESIDUAL_COLUMNS

SMALL = EnsembleConfig(iforest_estimators=50, knn_reference_size=2000, chunk_size=700)


def inputs(s: SyntheticLatents, rows=slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latents, residuals, snr) of the chosen rows: the arguments of fit and score."""
    return s.latents[rows], s.stats[rows], s.snr[rows]


@pytest.fixture(scope="module")
def train():
    return synthetic_latents(5000, seed=1, anomaly_fraction=0.005)


@pytest.fixture(scope="module")
def test_set():
    return synthetic_latents(3000, seed=2, anomaly_fraction=0.05)


@pytest.fixture(scope="module")
def ensemble(train) -> AnomalyEnsemble:
    return AnomalyEnsemble(SMALL).fit(*inputs(train), seed=0)


@pytest.fixture(scope="module")
def scored(ensemble, test_set):
    return ensemble.score(*inputs(test_set))


def test_planted_anomalies_rank_high(scored, test_set):
    y = test_set.is_anomaly
    assert list(scored.columns) == list(SCORE_COLUMNS)
    assert roc_auc_score(y, scored["ANOMALY_SCORE"]) > 0.9
    top = np.argsort(-scored["ANOMALY_SCORE"].to_numpy())[:50]
    assert y[top].mean() > 0.8  # anomalies are 5% of the set


def test_tail_probabilities_are_rank_normalised(scored, test_set):
    normal = scored[~test_set.is_anomaly]
    for col in [c for c in SCORE_COLUMNS if c.startswith("TAILP_") and c != "TAILP_FOREST"]:
        # a normal spectrum's tail probability is ~uniform: mean 1/2, 10% of them below 0.1
        assert normal[col].mean() == pytest.approx(0.5, abs=0.04), col
        assert (normal[col] < 0.1).mean() == pytest.approx(0.1, abs=0.03), col
    # FOREST_DIP is 0 (no forest pixels) for 60% of the spectra: they tie at the bottom and get
    # tail probabilities above 1/2 (no evidence); the others share the lower 40% uniformly
    forest = test_set.stats[~test_set.is_anomaly, STAT_COLUMNS.index("FOREST_DIP")] > 0
    tailp = normal["TAILP_FOREST"].to_numpy()
    assert tailp[~forest].min() > 0.5
    assert (tailp < 0.1).mean() == pytest.approx(0.1, abs=0.03)


def test_a_separate_reference_sets_the_tail_probabilities(train, test_set):
    """Reference spectra with twice the residual misfit: the same spectra look less anomalous."""
    fit, ref = inputs(train, slice(0, 3000)), inputs(train, slice(3000, None))
    base = AnomalyEnsemble(SMALL).fit(*fit, seed=0, reference=ref)
    inflated = (ref[0], ref[1].copy(), ref[2])
    inflated[1][:, : len(RESIDUAL_COLUMNS)] *= 2.0
    looser = AnomalyEnsemble(SMALL).fit(*fit, seed=0, reference=inflated)
    assert looser.info["n_reference"] == len(ref[0]) and looser.info["n_fit"] == 3000
    normal = ~test_set.is_anomaly
    a = base.score(*inputs(test_set))["TAILP_RECON"].to_numpy()[normal]
    b = looser.score(*inputs(test_set))["TAILP_RECON"].to_numpy()[normal]
    assert np.median(b) > np.median(a) + 0.3


def fitted_better(s: SyntheticLatents) -> SyntheticLatents:
    """The same spectra as the VAE fits them once it trained on them: most of their misfit gone
    (the misfit grows with S/N, so the gain does too)."""
    stats = s.stats.copy()
    stats[:, 0] = 1.0 + 0.3 * (stats[:, 0] - 1.0)
    return SyntheticLatents(s.latents, stats, s.snr, s.is_anomaly)


def test_spectra_the_vae_trained_on_have_their_own_reference(train, test_set):
    fit, ref = inputs(train, slice(0, 3000)), inputs(train, slice(3000, None))
    seen_ref = inputs(fitted_better(synthetic_latents(3000, seed=6)))
    ens = AnomalyEnsemble(SMALL).fit(*fit, seed=0, reference=ref, seen_reference=seen_ref)
    assert ens.info["n_seen_reference"] == 3000
    normal = ~test_set.is_anomaly
    seen = fitted_better(test_set)
    as_new = ens.score(*inputs(seen))["TAILP_RECON"].to_numpy()[normal]
    as_seen = ens.score(*inputs(seen), seen=np.ones(len(seen.snr), bool))
    snr = test_set.snr[normal]
    # against the reference of new spectra the better fits look normal beyond doubt (tail
    # probabilities near 1), the more the higher the S/N; against their own, uniform
    assert as_new.mean() > 0.6 and spearmanr(as_new, snr)[0] > 0.3
    recon = as_seen["TAILP_RECON"].to_numpy()[normal]
    assert recon.mean() == pytest.approx(0.5, abs=0.04) and abs(spearmanr(recon, snr)[0]) < 0.1
    mixed = np.arange(len(seen.snr)) % 2 == 0  # the flag applies row by row
    rows = ens.score(*inputs(seen), seen=mixed)
    np.testing.assert_allclose(rows["ANOMALY_SCORE"][mixed], as_seen["ANOMALY_SCORE"][mixed])
    with pytest.raises(AnomalyInputError, match="seen must have shape"):
        ens.score(*inputs(seen), seen=mixed[:10])


def test_score_of_normal_spectra_does_not_track_snr(scored, test_set):
    normal = ~test_set.is_anomaly
    snr = test_set.snr[normal]
    # the synthetic misfit grows with S/N (as the VAE's does), the S/N-binned score must not
    assert spearmanr(test_set.stats[normal, 0], snr)[0] > 0.5
    assert abs(spearmanr(scored.loc[normal, "ANOMALY_SCORE"], snr)[0]) < 0.1


def test_extreme_scores_stay_ordered_beyond_the_reference(ensemble, test_set):
    latents = np.repeat(test_set.latents[:1], 4, axis=0)
    residuals = np.repeat(test_set.stats[:1], 4, axis=0)
    residuals[:, 0] = [1.0, 5.0, 20.0, 80.0]
    out = ensemble.score(latents, residuals, np.full(4, 3.0))
    n_ref = ensemble.info["n_reference"]  # over all S/N bins: a bin holds fewer
    assert out["TAILP_RECON"].iloc[1] < 1 / (n_ref + 1)  # extrapolated past the reference
    assert np.all(np.diff(out["TAILP_RECON"]) <= 0)  # may underflow to 0 ...
    assert np.all(np.diff(out["ANOMALY_SCORE"]) > 0)  # ... the score keeps the order


def test_trough_tail_probabilities_follow_gaussian_tails(train):
    """FOREST_DIP of normal spectra: the largest of ~50 independent standard-normal window sums.
    Beyond the reference, a trough's tail probability is extrapolated on the s^2 / 2 scale, so it
    follows the true ``50 P(N(0,1) > s)`` instead of falling off linearly in ``-ln``."""
    col = STAT_COLUMNS.index("FOREST_DIP")
    ref = synthetic_latents(20_000, seed=4)
    ref.stats[:, col] = np.random.default_rng(0).normal(size=(20_000, 50)).max(axis=1)
    ens = AnomalyEnsemble(SMALL).fit(*inputs(train), seed=0, reference=inputs(ref))
    probe = synthetic_latents(50, seed=5)
    for s in (7.0, 9.0):  # beyond the largest of 20,000 reference values (about 5)
        probe.stats[:, col] = s
        nlp = -np.log(ens.score(*inputs(probe))["TAILP_FOREST"].to_numpy())
        assert np.median(nlp) == pytest.approx(-np.log(50 * norm.sf(s)), rel=0.15)


def test_scores_do_not_depend_on_batching(ensemble, test_set):
    whole = ensemble.score(*inputs(test_set))  # 5 internal chunks
    cuts = [0, 1, 137, 1500, 3000]
    parts = [ensemble.score(*inputs(test_set, slice(a, b))) for a, b in itertools.pairwise(cuts)]
    # BLAS sums differ in the last bits between batch sizes; exp() of extreme tails magnifies it
    np.testing.assert_allclose(
        np.concatenate([p.to_numpy() for p in parts]), whole.to_numpy(), rtol=1e-4
    )
    empty = ensemble.score(*inputs(test_set, slice(0, 0)))
    assert list(empty.columns) == list(SCORE_COLUMNS) and len(empty) == 0


def test_save_load_round_trip(ensemble, test_set, tmp_path):
    path = tmp_path / "detector.joblib"
    ensemble.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["detector.joblib"]  # no temporary left
    loaded = AnomalyEnsemble.load(path, latent_dim=128)
    assert loaded.info["n_train"] == 5000
    assert loaded.info["config"]["knn_reference_size"] == 2000
    assert {"numpy", "scikit-learn", "pyod", "desi_anomaly"} <= set(loaded.info["versions"])
    json.dumps(loaded.info)  # plain JSON: usable as asset metadata
    batch = slice(0, 500)
    np.testing.assert_array_equal(
        loaded.score(*inputs(test_set, batch)).to_numpy(),
        ensemble.score(*inputs(test_set, batch)).to_numpy(),
    )


def test_load_rejects_other_latent_dimension_and_other_files(ensemble, tmp_path):
    path = tmp_path / "detector.joblib"
    ensemble.save(path)
    with pytest.raises(ModelFileError, match="fitted on 128-d latents, expected 64-d"):
        AnomalyEnsemble.load(path, latent_dim=64)
    joblib.dump({"something": "else"}, tmp_path / "other.joblib")
    with pytest.raises(ModelFileError, match=r"not a desi_anomaly\.AnomalyEnsemble file"):
        AnomalyEnsemble.load(tmp_path / "other.joblib")
    (tmp_path / "broken.joblib").write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError, match=r"broken\.joblib: cannot be read"):
        AnomalyEnsemble.load(tmp_path / "broken.joblib")
    with pytest.raises(ModelFileError, match="no such file"):
        AnomalyEnsemble.load(tmp_path / "missing.joblib")


def test_wrong_latent_dimension_and_unfitted_use_are_errors(ensemble, test_set):
    with pytest.raises(AnomalyInputError, match="fitted on 128-d latents, got 64-d"):
        ensemble.score(test_set.latents[:10, :64], test_set.stats[:10], test_set.snr[:10])
    with pytest.raises(
        AnomalyInputError, match=rf"stats must have shape \(10, {len(STAT_COLUMNS)}\)"
    ):
        ensemble.score(test_set.latents[:10], test_set.stats[:9], test_set.snr[:10])
    with pytest.raises(AnomalyInputError, match=r"snr must have shape \(10,\)"):
        ensemble.score(test_set.latents[:10], test_set.stats[:10], test_set.snr[:9])
    with pytest.raises(DesiAnomalyError, match="before fit"):
        AnomalyEnsemble(SMALL).score(*inputs(test_set, slice(0, 10)))


def test_non_finite_rows_are_counted_in_the_error(ensemble, train):
    latents = train.latents.copy()
    latents[[3, 10, 11], 5] = np.nan
    residuals = train.stats.copy()
    residuals[20, 1] = np.inf
    snr = train.snr.copy()
    snr[30] = np.nan
    with pytest.raises(AnomalyInputError, match=r"5 of 5000 rows have non-finite .* row 3"):
        AnomalyEnsemble(SMALL).fit(latents, residuals, snr, seed=0)
    with pytest.raises(AnomalyInputError, match=r"3 of 100 rows"):
        ensemble.score(latents[:100], train.stats[:100], train.snr[:100])


def test_too_few_training_rows_is_an_error(train):
    with pytest.raises(AnomalyInputError, match=r"8 reference rows .* \(needs >= 50\)"):
        AnomalyEnsemble(SMALL).fit(*inputs(train, slice(0, 40)), seed=0)
    with pytest.raises(AnomalyInputError, match=r"30 reference rows .* \(needs >= 50\)"):
        AnomalyEnsemble(SMALL).fit(
            *inputs(train, slice(0, 1000)), seed=0, reference=inputs(train, slice(1000, 1030))
        )
    knn_bound = EnsembleConfig(reference_fraction=0.9)
    with pytest.raises(AnomalyInputError, match=r"KNN with n_neighbors=10 needs >= 11"):
        AnomalyEnsemble(knn_bound).fit(*inputs(train, slice(0, 70)), seed=0)


def test_dead_latent_dimension_gives_finite_scores(train, test_set):
    latents = train.latents.copy()
    latents[:, 100] = 0.25  # a dead VAE unit: constant in training
    ensemble = AnomalyEnsemble(SMALL).fit(latents, train.stats, train.snr, seed=0)
    out = ensemble.score(*inputs(test_set, slice(0, 200)))
    assert np.isfinite(out.to_numpy()).all()


def test_fit_is_reproducible_with_a_seed(train, test_set, ensemble):
    again = AnomalyEnsemble(SMALL).fit(*inputs(train), seed=0)
    batch = slice(0, 300)
    np.testing.assert_allclose(
        again.score(*inputs(test_set, batch)).to_numpy(),
        ensemble.score(*inputs(test_set, batch)).to_numpy(),
        rtol=1e-6,
    )


def test_weak_lines_raise_the_lines_component(ensemble, test_set):
    rows = np.flatnonzero(~test_set.is_anomaly)[:200]
    latents, stats, snr = inputs(test_set, rows)
    weak = stats.copy()
    weak[:, 3:] *= 0.2  # every measured line 5x weaker
    before = ensemble.score(latents, stats, snr)["TAILP_LINES"].to_numpy()
    after = ensemble.score(latents, weak, snr)["TAILP_LINES"].to_numpy()
    measured = np.isfinite(stats[:, 3:]).any(axis=1)
    assert np.median(after[measured]) < 0.01 < np.median(before[measured])
    np.testing.assert_array_equal(after[~measured], before[~measured])  # nothing to compare
