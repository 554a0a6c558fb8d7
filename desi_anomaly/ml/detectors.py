"""Anomaly detectors on VAE latents, combined with reconstruction residual statistics into one
anomaly score.

Components (each one a score, larger = more anomalous):

- ``IFOREST``: PyOD Isolation Forest on the full latent vectors (isolation, axis-parallel trees).
- ``PCA``: PyOD PCA detector on the standardised full latent vectors (linear model: distances to
  the principal axes weighted by the inverse of their variance, so dominated by the low-variance
  axes; catches excursions along near-collapsed latent directions that the other two barely see).
- ``KNN``: PyOD k-nearest-neighbour mean distance (proximity) in the leading principal components of
  the latents, against a capped reference sample, so that scoring costs O(reference size) per
  spectrum at any catalogue size.
- ``RECON``, ``DIP``, ``PEAK``, ``FOREST``: the VAE reconstruction's reduced chi2, its strongest
  missed absorption redward of Lyman-alpha, emission feature and absorption in the forest's damped
  Lyman-alpha search window (``RECON_RCHI2``, ``RESID_DIP``, ``RESID_PEAK``, ``FOREST_DIP`` of
  ``desi_anomaly.ml.residuals``). RECON and PEAK are scored on a log scale (``LOG_SCALE``): their
  upper tails are close to power laws (the misfit of rare but normal spectra grows with S/N; noise
  spikes at low S/N), which the exponential tail below would extrapolate far too steeply on the raw
  scale. DIP and FOREST are scored as ``s^2 / 2`` (``SQUARE_SCALE``): they are maxima of window sums
  of normalised residuals, standard normal with the extra variance of ``desi_anomaly.ml.noise``,
  whose tail probability falls as ``exp(-s^2 / 2)``; an exponential tail in ``s`` itself would rate
  a 9-sigma trough (a damped Lyman-alpha system) barely above the 6-sigma fluctuations of normal
  forests and let misfits of other components outrank it.
- ``LINES``: line weakness, minus the mean over the measured broad lines (``EW_*`` columns of the
  cleaned shards; NaN where a line is not covered) of the standardised log equivalent width
  (median and MAD of the training spectra). The reconstruction fits a weak-line quasar with ease
  (in linear flux it is a modest outlier), but on a log scale every one of its lines is low.

ECOD/COPOD are not used: PyOD scores new rows by recomputing the ECDFs over the training set plus
the whole batch, so a spectrum's score depends on which other spectra share its batch, and every
batch costs a pass over the training set. HBOS was tried and dropped: it sums per-dimension
log-densities and saturates outside the histogram range, so large single-direction excursions are
lost in the sum over 128 dimensions.

Combination rule. ``fit`` fits the detectors on the training rows and scores reference rows as new
data: normal spectra the VAE did not train on (``reference``), or else a random
``reference_fraction`` of the training rows held out from the detectors. The reference rows are
split into S/N bins of equal size (at least ``min_per_snr_bin`` rows each): a spectrum's components
are compared with the reference spectra of its S/N bin only, since noise changes every component
(reconstruction misfit grows with S/N, latents scatter more at low S/N) and the score of a normal
spectrum should not track S/N. Within its bin, the tail probability of a component score s is ``(1 +
#{ref >= s}) / (n_ref + 1)`` (rank normalisation); beyond the ``(m+1)``-th largest reference score u
(m = min(100, n_ref // 10)) it is extrapolated with an exponential tail, ``(m + 1) / (n_ref + 1) *
exp(-(s - u) / scale)`` with scale = mean excess of the top m, so extreme spectra keep distinct
scores instead of tying at ``1 / (n_ref + 1)``. The combined ``ANOMALY_SCORE`` is the largest
``-ln(tail probability)`` over the components: about 2.7 for a typical spectrum (the mean largest of
8 unit exponentials), large when any one component is extreme. It is a ranking score, not a p-value;
``desi_anomaly.ml.significance`` calibrates it.

Spectra the VAE trained on (``seen`` in ``score``) are compared with a second reference, normal
spectra the VAE trained on but the detectors did not (``seen_reference`` in ``fit``), when there is
one: the VAE reconstructs its own training spectra better than new ones, most of all at high S/N,
so against the first reference their scores would fall with S/N.
"""

from __future__ import annotations

import functools
import platform
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pyod
import sklearn
from pyod.models.iforest import IForest
from pyod.models.knn import KNN
from pyod.models.pca import PCA as PCADetector
from sklearn.decomposition import PCA
from threadpoolctl import ThreadpoolController

from desi_anomaly import __version__
from desi_anomaly.atomic import atomic_path
from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.preprocess.features import BROAD_LINES

from .residuals import RESIDUAL_COLUMNS

LATENT_DETECTORS = ("IFOREST", "PCA", "KNN")
#: Residual components and the latents-table columns they read (``RESIDUAL_COLUMNS`` order).
RESIDUAL_COMPONENTS = dict(zip(("RECON", "DIP", "PEAK", "FOREST"), RESIDUAL_COLUMNS, strict=True))
#: Broad-line equivalent widths read by the LINES component (NaN allowed).
LINE_EW_COLUMNS = tuple(f"EW_{line.name}" for line in BROAD_LINES)
#: Columns of the ``stats`` array of ``fit`` and ``score``, in order (``stats_matrix``).
STAT_COLUMNS = (*RESIDUAL_COLUMNS, *LINE_EW_COLUMNS)
COMPONENTS = (*LATENT_DETECTORS, *RESIDUAL_COMPONENTS, "LINES")
#: Residual components scored on a log scale (module doc).
LOG_SCALE = ("RECON", "PEAK")
#: Residual components scored as s^2 / 2 (module doc).
SQUARE_SCALE = ("DIP", "FOREST")
EW_FLOOR = 1.0  # Angstrom: smaller (or negative, noisy) EWs count as this before the log
SCORE_COLUMNS = (
    *(f"SCORE_{name}" for name in LATENT_DETECTORS),
    *(f"TAILP_{name}" for name in COMPONENTS),
    "ANOMALY_SCORE",
)
MIN_REFERENCE_ROWS = 50
FORMAT = "desi_anomaly.AnomalyEnsemble"
FORMAT_VERSION = 6


class AnomalyInputError(DesiAnomalyError, ValueError):
    """Arrays that cannot be scored: wrong shape, non-finite values or too few rows."""


class ModelFileError(DesiAnomalyError):
    """A persisted detector or calibrator that cannot be used: names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class EnsembleConfig:
    """Detector settings; the defaults keep scoring 1.6M x 128 latents to minutes on 2 cores."""

    iforest_estimators: int = 100
    iforest_max_samples: int = 256
    knn_neighbors: int = 10
    knn_reference_size: int = 10_000
    knn_pca_components: int = 32
    reference_fraction: float = 0.2
    min_per_snr_bin: int = 100
    max_snr_bins: int = 16
    chunk_size: int = 32_768  # rows scored at once inside ``score``, bounds temporary memory
    n_jobs: int = 1  # threads (joblib, BLAS, OpenMP); the pipeline parallelises over shards


class _TailModel:
    """Tail probability of one component score against its reference scores (see module doc)."""

    def __init__(self, reference: np.ndarray):
        ref = np.sort(np.asarray(reference, dtype=np.float64))
        n = ref.size
        self.m = min(100, n // 10)
        self.sorted = ref
        self.threshold = float(ref[n - self.m - 1])
        self.scale = float(np.mean(ref[n - self.m :] - self.threshold))

    def neg_log(self, s: np.ndarray) -> np.ndarray:
        """``-ln`` of the tail probability of scores ``s``."""
        s = np.asarray(s, dtype=np.float64)
        n = self.sorted.size
        n_ge = n - np.searchsorted(self.sorted, s, side="left")
        nlp = np.log(n + 1) - np.log1p(n_ge)
        if self.scale > 0:
            tail = np.log(n + 1) - np.log(self.m + 1) + (s - self.threshold) / self.scale
            nlp = np.where(s > self.threshold, tail, nlp)
        return nlp


class _SnrTails:
    """Tail models of every component within S/N bins of the reference rows (see module doc)."""

    def __init__(self, scores: dict[str, np.ndarray], snr: np.ndarray, per_bin: int, max_bins: int):
        n_bins = int(np.clip(len(snr) // max(per_bin, 1), 1, max_bins))
        self.edges = np.quantile(snr, np.linspace(0, 1, n_bins + 1)[1:-1])
        bins = self.bin(snr)
        self.tails = [
            {name: _TailModel(values[bins == b]) for name, values in scores.items()}
            for b in range(n_bins)
        ]

    def bin(self, snr: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, snr, side="right")

    def neg_log(self, scores: dict[str, np.ndarray], snr: np.ndarray) -> dict[str, np.ndarray]:
        """``-ln`` tail probability of each component's scores in each row's S/N bin."""
        bins = self.bin(snr)
        out = {name: np.empty(len(snr)) for name in scores}
        for b, tails in enumerate(self.tails):
            rows = bins == b
            for name, values in scores.items():
                out[name][rows] = tails[name].neg_log(values[rows])
        return out


def _log_ew(stats: np.ndarray) -> np.ndarray:
    """log of the line EW columns of ``stats`` (NaN stays NaN)."""
    ew = stats[:, len(RESIDUAL_COLUMNS) :]
    return np.log(np.maximum(ew, EW_FLOOR, where=np.isfinite(ew), out=ew.copy()))


def _scale(name: str, values: np.ndarray) -> np.ndarray:
    """A residual component's score on the scale where its tail is exponential (module doc)."""
    if name in LOG_SCALE:
        return np.log(np.maximum(values, 1e-3))
    if name in SQUARE_SCALE:
        return np.sign(values) * values**2 / 2
    return values


def combine(neg_log_tail: np.ndarray) -> np.ndarray:
    """ANOMALY_SCORE from the (n_components, n) ``-ln`` tail probabilities."""
    return neg_log_tail.max(axis=0)


def check_finite_rows(name: str, *columns: np.ndarray) -> None:
    """Raise ``AnomalyInputError`` naming how many rows hold a NaN or infinite value."""
    good = np.ones(len(columns[0]), dtype=bool)
    for col in columns:
        finite = np.isfinite(col)
        good &= finite if finite.ndim == 1 else finite.all(axis=1)
    n_bad = int((~good).sum())
    if n_bad:
        first = int(np.flatnonzero(~good)[0])
        raise AnomalyInputError(
            f"{n_bad} of {good.size} rows have non-finite {name} (first at row {first}); "
            "drop or repair them before fitting or scoring"
        )


def _as_inputs(
    latents: np.ndarray, stats: np.ndarray, snr: np.ndarray, latent_dim: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(latents, dtype=np.float32)
    r = np.asarray(stats, dtype=np.float64)
    s = np.asarray(snr, dtype=np.float64)
    if x.ndim != 2:
        raise AnomalyInputError(f"latents must be 2-D (n_spectra, latent_dim), got shape {x.shape}")
    if r.shape != (x.shape[0], len(STAT_COLUMNS)):
        raise AnomalyInputError(
            f"stats must have shape ({x.shape[0]}, {len(STAT_COLUMNS)}) (columns "
            f"{', '.join(STAT_COLUMNS)}) to match the latents, got {r.shape}"
        )
    if s.shape != (x.shape[0],):
        raise AnomalyInputError(f"snr must have shape ({x.shape[0]},), got {s.shape}")
    if latent_dim is not None and x.shape[1] != latent_dim:
        raise AnomalyInputError(
            f"the detector was fitted on {latent_dim}-d latents, got {x.shape[1]}-d latents"
        )
    check_finite_rows("latents, residual statistics or S/N", x, r[:, : len(RESIDUAL_COLUMNS)], s)
    return x, r, s


def stats_matrix(table: pd.DataFrame) -> np.ndarray:
    """(n, len(STAT_COLUMNS)) residual statistics and line EWs of a table (EW columns it lacks
    are NaN: no line measured)."""
    return table.reindex(columns=list(STAT_COLUMNS)).to_numpy(dtype=np.float64)


class AnomalyEnsemble:
    """Isolation Forest + PCA + KNN on latents plus the residual statistics, combined into
    ANOMALY_SCORE within S/N bins."""

    def __init__(self, config: EnsembleConfig | None = None):
        self.config = config or EnsembleConfig()
        self.info: dict[str, Any] = {}

    @property
    def latent_dim(self) -> int | None:
        """Latent dimension the ensemble was fitted on (None before ``fit``)."""
        return self.info.get("latent_dim")

    def fit(
        self,
        latents: np.ndarray,
        stats: np.ndarray,
        snr: np.ndarray,
        *,
        seed: int,
        reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        seen_reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> AnomalyEnsemble:
        """Fit on a training sample: latents (n, d), residual statistics and line EWs
        (n, len(STAT_COLUMNS), ``stats_matrix``) and median S/N (n,).

        ``reference``: (latents, stats, snr) of normal spectra the VAE did not train on, against
        which the tail probabilities are measured. Without it a ``reference_fraction`` of the
        training rows is held out instead; if the VAE trained on those spectra it reconstructs them
        better than new ones, so new normal spectra then get too small tail probabilities.

        ``seen_reference``: the same for normal spectra the VAE did train on (but the detectors
        not): ``score`` measures the tail probabilities of such spectra (``seen``) against these,
        since the VAE fits them better than new spectra, most of all at high S/N.
        """
        cfg = self.config
        x, r, s = _as_inputs(latents, stats, snr, None)
        perm = np.random.default_rng(seed).permutation(len(x))
        if reference is None:
            n_ref = int(cfg.reference_fraction * len(x))
            ref_rows, perm = np.sort(perm[:n_ref]), perm[n_ref:]
            x_ref, r_ref, s_ref = x[ref_rows], r[ref_rows], s[ref_rows]
        else:
            x_ref, r_ref, s_ref = _as_inputs(*reference, x.shape[1])
        fit_rows, knn_rows = np.sort(perm), np.sort(perm[: cfg.knn_reference_size])
        n_fit, n_ref = len(fit_rows), len(x_ref)
        if n_ref < MIN_REFERENCE_ROWS or n_fit < cfg.knn_neighbors + 1:
            raise AnomalyInputError(
                f"fit got {n_fit} rows to fit the detectors (KNN with n_neighbors="
                f"{cfg.knn_neighbors} needs >= {cfg.knn_neighbors + 1}) and {n_ref} reference "
                f"rows for the tail probabilities (needs >= {MIN_REFERENCE_ROWS})"
            )
        with _threadpools().limit(limits=cfg.n_jobs):
            self._fit_detectors(x[fit_rows], x[knn_rows], seed)
            log_ew = _log_ew(r[fit_rows])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # lines never measured
                self.ew_median_ = np.nanmedian(log_ew, axis=0)
                mad = np.nanmedian(np.abs(log_ew - self.ew_median_), axis=0)
            self.ew_scale_ = np.where(mad > 0, 1.4826 * mad, 1.0)
            self.tails_ = self._tails(x_ref, r_ref, s_ref)
            self.seen_tails_ = None
            if seen_reference is not None:
                x_seen, r_seen, s_seen = _as_inputs(*seen_reference, x.shape[1])
                if len(x_seen) < MIN_REFERENCE_ROWS:
                    raise AnomalyInputError(
                        f"fit got {len(x_seen)} seen reference rows (needs >= {MIN_REFERENCE_ROWS})"
                    )
                self.seen_tails_ = self._tails(x_seen, r_seen, s_seen)
        self.info = {
            "latent_dim": int(x.shape[1]),
            "n_train": len(x),
            "n_fit": n_fit,
            "n_reference": n_ref,
            "n_seen_reference": 0 if seen_reference is None else len(seen_reference[0]),
            "n_knn_reference": len(knn_rows),
            "snr_bin_edges": self.tails_.edges.tolist(),
            "knn_pca_components": self.knn_projection_.n_components_,
            "knn_pca_explained_variance": float(
                self.knn_projection_.explained_variance_ratio_.sum()
            ),
            "seed": seed,
            "config": asdict(cfg),
            "versions": _versions(),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return self

    def _tails(self, x: np.ndarray, r: np.ndarray, s: np.ndarray) -> _SnrTails:
        """Tail models of every component on reference rows (latents, stats, S/N)."""
        cfg = self.config
        return _SnrTails(self._component_scores(x, r), s, cfg.min_per_snr_bin, cfg.max_snr_bins)

    def _fit_detectors(self, x_fit: np.ndarray, x_knn: np.ndarray, seed: int) -> None:
        """Fit the detectors on ``x_fit`` (KNN on ``x_knn``)."""
        cfg = self.config
        self.iforest_ = IForest(
            n_estimators=cfg.iforest_estimators,
            max_samples=min(cfg.iforest_max_samples, len(x_fit)),
            random_state=seed,
            n_jobs=cfg.n_jobs,
        ).fit(x_fit)
        # constant latent dimensions (dead units) and n <= d give zero-variance axes: leave them out
        rank = min(int(np.count_nonzero(np.ptp(x_fit, axis=0))), len(x_fit) - 1)
        self.pca_ = PCADetector(n_components=rank, random_state=seed).fit(x_fit)
        n_pc = min(cfg.knn_pca_components, x_knn.shape[1], len(x_knn))
        self.knn_projection_ = PCA(n_components=n_pc, random_state=seed).fit(x_knn)
        self.knn_ = KNN(n_neighbors=cfg.knn_neighbors, method="mean", n_jobs=cfg.n_jobs)
        self.knn_.fit(self.knn_projection_.transform(x_knn))

    def _component_scores(self, x: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
        scores = {
            "IFOREST": self.iforest_.decision_function(x),
            "PCA": self.pca_.decision_function(x),
            "KNN": self.knn_.decision_function(self.knn_projection_.transform(x)),
        }
        for i, name in enumerate(RESIDUAL_COMPONENTS):
            scores[name] = _scale(name, r[:, i])
        z = (_log_ew(r) - self.ew_median_) / self.ew_scale_
        measured = np.isfinite(z).sum(axis=1)
        weakness = -np.where(np.isfinite(z), z, 0.0).sum(axis=1) / np.maximum(measured, 1)
        return scores | {"LINES": weakness}

    def score(
        self,
        latents: np.ndarray,
        stats: np.ndarray,
        snr: np.ndarray,
        seen: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """Score a batch; each row's result depends only on that row and the fitted ensemble.

        ``seen`` (bool per row): spectra the VAE trained on, whose tail probabilities are measured
        against the seen reference of ``fit`` (when it had one; otherwise like all others).

        Returns one row per spectrum: ``SCORE_IFOREST``, ``SCORE_PCA``, ``SCORE_KNN`` (raw detector
        scores), ``TAILP_<component>`` (tail probability of each component against the reference
        spectra of its S/N bin) and ``ANOMALY_SCORE`` (largest ``-ln TAILP``).
        """
        if not self.info:
            raise DesiAnomalyError("AnomalyEnsemble.score called before fit or load")
        x, r, s = _as_inputs(latents, stats, snr, self.latent_dim)
        seen = np.zeros(len(x), bool) if seen is None else np.asarray(seen, dtype=bool)
        if seen.shape != (len(x),):
            raise AnomalyInputError(f"seen must have shape ({len(x)},), got {seen.shape}")
        step = self.config.chunk_size
        with _threadpools().limit(limits=self.config.n_jobs):
            parts = [
                self._score_chunk(
                    x[i : i + step], r[i : i + step], s[i : i + step], seen[i : i + step]
                )
                for i in range(0, len(x), step)
            ]
        if not parts:
            return pd.DataFrame({col: np.empty(0) for col in SCORE_COLUMNS})
        return pd.concat(parts, ignore_index=True)

    def _score_chunk(
        self, x: np.ndarray, r: np.ndarray, s: np.ndarray, seen: np.ndarray
    ) -> pd.DataFrame:
        raw = self._component_scores(x, r)
        nlp = self.tails_.neg_log(raw, s)
        if self.seen_tails_ is not None and seen.any():
            again = self.seen_tails_.neg_log({k: v[seen] for k, v in raw.items()}, s[seen])
            for name, values in again.items():
                nlp[name][seen] = values
        out = {f"SCORE_{name}": raw[name] for name in LATENT_DETECTORS}
        out |= {f"TAILP_{name}": np.exp(-nlp[name]) for name in COMPONENTS}
        out["ANOMALY_SCORE"] = combine(np.stack([nlp[name] for name in COMPONENTS]))
        return pd.DataFrame(out)

    def save(self, path: str | Path) -> None:
        """Write the fitted ensemble (joblib, with its ``info`` dict embedded) atomically."""
        if not self.info:
            raise DesiAnomalyError("AnomalyEnsemble.save called before fit")
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "info": self.info,
            "ensemble": self,
        }
        with atomic_path(path) as tmp:
            joblib.dump(payload, tmp, compress=3)

    @classmethod
    def load(cls, path: str | Path, *, latent_dim: int | None = None) -> AnomalyEnsemble:
        """Read a saved ensemble; ``latent_dim`` (if given) must match the one it was fitted on.

        Only load files you trust: joblib files can run code when read.
        """
        payload = _load_joblib(path)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ModelFileError(path, f"not a {FORMAT} file")
        if payload.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                path,
                f"format version {payload.get('format_version')}, this code reads "
                f"version {FORMAT_VERSION}; refit the detector",
            )
        info = payload["info"]
        if latent_dim is not None and info["latent_dim"] != latent_dim:
            raise ModelFileError(
                path,
                f"detector fitted on {info['latent_dim']}-d latents, expected {latent_dim}-d "
                "(it belongs to a different VAE; refit it on this VAE's latents)",
            )
        saved, now = info["versions"], _versions()
        changed = [k for k in ("scikit-learn", "pyod") if saved.get(k) != now[k]]
        if changed:
            was = ", ".join(f"{k} {saved.get(k)}" for k in changed)
            running = ", ".join(f"{k} {now[k]}" for k in changed)
            warnings.warn(f"{path}: saved with {was}, running {running}", stacklevel=2)
        return payload["ensemble"]


@functools.cache
def _threadpools() -> ThreadpoolController:
    """BLAS/OpenMP pools, inspected once: ``threadpool_limits`` rescans them (~10 ms) per call."""
    return ThreadpoolController()


def _versions() -> dict[str, str]:
    return {
        "desi_anomaly": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "pyod": pyod.__version__,
    }


def _load_joblib(path: str | Path) -> Any:
    if not Path(path).is_file():
        raise ModelFileError(path, "no such file")
    try:
        return joblib.load(path)
    except Exception as exc:  # joblib/pickle raise many types for a damaged file
        raise ModelFileError(path, f"cannot be read as a joblib file ({exc})") from exc


@dataclass
class SyntheticLatents:
    """Synthetic VAE outputs: latents, residual statistics, median S/N and the anomaly flags."""

    latents: np.ndarray  # (n, dim) float32
    stats: np.ndarray  # (n, len(STAT_COLUMNS)) float64: residual statistics, line EWs
    snr: np.ndarray  # (n,) float64
    is_anomaly: np.ndarray  # (n,) bool


_STRUCTURE_SEED = 20240601


def synthetic_latents(
    n: int, *, seed: int, dim: int = 128, anomaly_fraction: float = 0.0, n_active: int = 16
) -> SyntheticLatents:
    """Draw VAE-like outputs for tests and benchmarks (not a model of real spectra).

    Normal spectra: a 6-component Gaussian mixture in ``n_active`` latent dimensions whose spread
    grows at low S/N, the other dimensions near-collapsed (sigma 0.05); RECON_RCHI2 near 1 and
    RESID_DIP/RESID_PEAK near the maximum of a few thousand standard normals, each with a
    model-mismatch term growing with S/N; FOREST_DIP like them for 40% (the forest covered),
    0 for the others; log-normal line EWs, half of them NaN (not covered).
    S/N follows the DR1 QSO distribution (median 2.3).
    The mixture is the same for every ``seed``, so chunks drawn with different seeds form one
    population. Anomalies (three kinds in equal shares): excursions in three collapsed dimensions,
    latents far from the mixture, or a residual excess only (RECON_RCHI2 and RESID_DIP); all have
    RECON_RCHI2 raised.
    """
    structure = np.random.default_rng(_STRUCTURE_SEED)
    n_clusters = 6
    centres = structure.normal(0.0, 1.5, size=(n_clusters, n_active))
    mixing = structure.normal(0.0, 0.5 / np.sqrt(n_active), size=(n_clusters, n_active, n_active))
    mixing += 0.5 * np.eye(n_active)
    weights = structure.dirichlet(np.full(n_clusters, 3.0))

    rng = np.random.default_rng(seed)
    snr = np.clip(rng.lognormal(np.log(2.3), 1.05, n), 0.1, 200.0)
    k = rng.choice(n_clusters, size=n, p=weights)
    spread = 0.6 + 1.0 / np.sqrt(snr)
    eps = rng.normal(size=(n, n_active))
    z = np.empty((n, dim), dtype=np.float32)
    for c in range(n_clusters):
        rows = k == c
        z[rows, :n_active] = centres[c] + spread[rows, None] * (eps[rows] @ mixing[c].T)
    z[:, n_active:] = rng.normal(0.0, 0.05, size=(n, dim - n_active))
    rchi2 = 1.0 + rng.normal(0.0, 0.026, n) + (0.05 * snr) ** 2 * rng.lognormal(0.0, 0.3, n)
    dip, peak = (
        3.3 + rng.gumbel(0.0, 0.3, n) + 0.05 * snr * rng.lognormal(0.0, 0.3, n) for _ in "dp"
    )

    forest = np.where(rng.random(n) < 0.4, 3.0 + rng.gumbel(0.0, 0.3, n), 0.0)

    bad = rng.random(n) < anomaly_fraction
    kind = rng.integers(0, 3, size=n)
    off = np.flatnonzero(bad & (kind == 0))
    cols = rng.integers(n_active, dim, size=(off.size, 3))
    z[off[:, None], cols] += rng.normal(0.0, 1.0, size=cols.shape).astype(np.float32)
    far = bad & (kind == 1)
    z[far, :n_active] = rng.normal(0.0, 4.0, size=(int(far.sum()), n_active))
    rchi2[bad] *= rng.uniform(1.3, 3.0, int(bad.sum()))
    rchi2[bad & (kind == 2)] *= 1.5
    dip[bad & (kind == 2)] += rng.uniform(2.0, 10.0, int((bad & (kind == 2)).sum()))
    ew = 30.0 * rng.lognormal(0.0, 0.5, (n, len(LINE_EW_COLUMNS)))
    ew[rng.random(ew.shape) < 0.5] = np.nan  # lines outside the observed range
    return SyntheticLatents(z, np.column_stack([rchi2, dip, peak, forest, ew]), snr, bad)
