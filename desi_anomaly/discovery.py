"""The discovery stages after cleaning, each a plain function over an output ``Layout``:

``train_checkpoint`` (VAE on the train split) -> ``encode_partitions`` (latents per partition) ->
``fit_detector`` (ensemble on train latents with tail probabilities against the reference split,
conformal calibrator on the calibration split) ->
``score_partition`` (score and p-value per spectrum) -> ``cluster_anomalies`` (BH q-values over all
scored spectra, types of the significant ones) -> ``write_catalog`` (ranked catalog, evidence,
plots, Parquet/FITS/DuckDB outputs).

Splits come from ``desi_anomaly.splits`` (a hash of TARGETID). Anomalies in the calibration split
make p-values conservative, never anti-conservative. Training and encoding run on Ray when a Ray
runtime is connected (``ray.is_initialized()``), in this process otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from desi_anomaly.atomic import atomic_path
from desi_anomaly.catalog import build_catalog, explain_catalog, plot_top_anomalies, regions_table
from desi_anomaly.catalog.build import DEFAULT_ALPHA
from desi_anomaly.catalog.writers import write_outputs
from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.ingest import shard_path
from desi_anomaly.io.partitions import parse_key
from desi_anomaly.ml import (
    EncodeResult,
    Reconstructions,
    TrainedVAE,
    VAEConfig,
    encode_partition,
    latents_path,
    load_checkpoint,
    reconstruct,
    train_vae,
)
from desi_anomaly.ml.anomaly_types import AnomalyTypes, find_anomaly_types
from desi_anomaly.ml.detectors import MIN_REFERENCE_ROWS, AnomalyEnsemble, stats_matrix
from desi_anomaly.ml.raydispatch import encode_shards_on_ray, train_on_ray
from desi_anomaly.ml.significance import ConformalCalibrator, benjamini_hochberg
from desi_anomaly.ml.training import CHECKPOINT_NAME
from desi_anomaly.preprocess import RestFrameGrid
from desi_anomaly.shards import read_shard
from desi_anomaly.splits import SPLITS, assign_split

#: Per-spectrum columns carried from the cleaned shard into the scores.
META_COLUMNS = (
    "TARGETID",
    "TARGET_RA",
    "TARGET_DEC",
    "Z",
    "ZERR",
    "DELTACHI2",
    "TILEID",
    "FIBER",
    "LASTNIGHT",
    "SNR_MEDIAN",
    "N_GOOD_PIXELS",
    "ALPHA_CONT",
    "EW_LYA",
    "FWHM_LYA",
    "EW_CIV",
    "FWHM_CIV",
    "EW_CIII",
    "FWHM_CIII",
    "EW_MGII",
    "FWHM_MGII",
    "EW_HBETA",
    "FWHM_HBETA",
    "BI_CIV",
    "BAL_FLAG",
)
SNR_EDGES = np.array([0.0, 1.0, 2.0, 4.0, 8.0, np.inf])
Z_EDGES = np.array([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, np.inf])
#: Redshifts below 1 and from 5 up are calibrated apart from the bulk (``ConformalCalibrator``).
Z_ISOLATED = (1.0, 5.0)
#: Share of the VAE's training spectra held out from the detectors as the seen reference.
SEEN_REFERENCE_FRACTION = 0.2


@dataclass(frozen=True)
class Layout:
    """Where every data product lives under one output root."""

    root: Path

    def cleaned(self, key: str) -> Path:
        return shard_path(self.root, key)

    def latents(self, key: str) -> Path:
        return latents_path(self.root, key)

    def scores(self, key: str) -> Path:
        return self.root / "scores" / f"{parse_key(key)}.parquet"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def detector(self) -> Path:
        return self.model_dir / "detector.joblib"

    @property
    def calibrator(self) -> Path:
        return self.model_dir / "calibrator.npz"

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / CHECKPOINT_NAME

    @property
    def clusters(self) -> Path:
        """One row per significant anomaly: TARGETID, CLUSTER, TYPE, UMAP_X, UMAP_Y."""
        return self.root / "clusters" / "clusters.parquet"

    @property
    def cluster_summary(self) -> Path:
        """One row per cluster: type, size, feature medians, residual signatures."""
        return self.root / "clusters" / "cluster_summary.parquet"

    @property
    def catalog_dir(self) -> Path:
        return self.root / "catalog"


def partition_inputs(layout: Layout, key: str) -> pd.DataFrame:
    """Latents joined with the shard's per-spectrum metadata for one partition, with SPLIT."""
    latents = pq.read_table(layout.latents(key)).to_pandas()
    shard_meta = pq.read_table(layout.cleaned(key)).drop_columns(["FLUX", "IVAR", "COVERAGE"])
    meta = shard_meta.to_pandas()
    meta = meta[[c for c in META_COLUMNS if c in meta]]
    table = latents.merge(meta, on="TARGETID", how="left", validate="one_to_one")
    if len(table) != len(latents) or table["Z"].isna().any():
        raise DesiAnomalyError(f"{layout.latents(key)}: latents do not match the cleaned shard")
    table["SPLIT"] = assign_split(table["TARGETID"].to_numpy())
    return table


def _stack(frames: list[pd.DataFrame], split: str) -> pd.DataFrame:
    parts = [f[f["SPLIT"] == split] for f in frames]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _detector_inputs(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latents, stats, S/N) of a table of latents rows: the inputs of the ensemble."""
    return np.stack(table["LATENT"].to_numpy()), stats_matrix(table), table["SNR_MEDIAN"].to_numpy()


def stratum_size(alpha: float, min_discovery_fraction: float) -> int:
    """Calibration spectra per S/N x z stratum so that BH at ``alpha`` can reject a spectrum of any
    stratum once ``min_discovery_fraction`` of all spectra are anomalies: a conformal p-value is at
    least ``1 / (n_k + 1)`` and BH needs ``p <= alpha * R / m``, so ``n_k >= 1 / (alpha * f)``."""
    return int(np.ceil(1.0 / (alpha * min_discovery_fraction)))


def fit_detector(
    layout: Layout,
    keys: list[str],
    *,
    seed: int = 0,
    max_train: int = 200_000,
    alpha: float = DEFAULT_ALPHA,
    min_discovery_fraction: float = 0.01,
) -> tuple[AnomalyEnsemble, ConformalCalibrator]:
    """Fit the ensemble on train-split latents (tail probabilities against the reference split,
    which the VAE did not train on, and for the spectra it trained on against a held-out
    ``SEEN_REFERENCE_FRACTION`` of them) and calibrate on the calibration split; save both.

    Only the latents, residual statistics, S/N and Z of each partition are held, and the training
    sample is capped at ``max_train`` spectra. Strata hold ``stratum_size(alpha,
    min_discovery_fraction)`` calibration spectra (one stratum when there are fewer).
    """
    frames = [partition_inputs(layout, k) for k in keys]
    train, reference, calib = (_stack(frames, split) for split in SPLITS[:3])
    frames.clear()
    train = train[np.isfinite(train["RECON_RCHI2"])]
    reference = reference[np.isfinite(reference["RECON_RCHI2"])]
    if len(train) > max_train:
        train = train.sample(max_train, random_state=seed)
    if len(reference) > max_train:
        reference = reference.sample(max_train, random_state=seed)
    if train.empty or reference.empty or calib.empty:
        raise DesiAnomalyError(
            f"{len(train)} training, {len(reference)} reference and {len(calib)} calibration "
            "spectra: need all three to be non-empty"
        )
    # a share of the spectra the VAE trained on, held out from the detectors, is the reference
    # of the seen spectra (AnomalyEnsemble.fit)
    seen = train[train["VAE_TRAINED"]].sample(frac=SEEN_REFERENCE_FRACTION, random_state=seed)
    seen_reference = None
    if len(seen) >= MIN_REFERENCE_ROWS:
        train = train.drop(index=seen.index)
        seen_reference = _detector_inputs(seen)
    ensemble = AnomalyEnsemble().fit(
        *_detector_inputs(train),
        seed=seed,
        reference=_detector_inputs(reference),
        seen_reference=seen_reference,
    )
    calib = calib[np.isfinite(calib["RECON_RCHI2"])]
    cal_scores = ensemble.score(*_detector_inputs(calib))["ANOMALY_SCORE"].to_numpy()
    calibrator = ConformalCalibrator().fit(
        cal_scores,
        calib["SNR_MEDIAN"].to_numpy(),
        calib["Z"].to_numpy(),
        snr_edges=SNR_EDGES,
        z_edges=Z_EDGES,
        min_per_stratum=min(stratum_size(alpha, min_discovery_fraction), len(calib)),
        z_isolated=Z_ISOLATED,
    )
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    ensemble.save(layout.detector)
    calibrator.save(layout.calibrator)
    return ensemble, calibrator


def score_partition(
    layout: Layout, key: str, ensemble: AnomalyEnsemble, calibrator: ConformalCalibrator
) -> Path:
    """Score one partition: ANOMALY_SCORE, its components and conformal P_VALUE; written atomically.

    Spectra whose reconstruction chi2 is undefined (no good pixels) get NaN scores and P_VALUE 1.
    """
    table = partition_inputs(layout, key)
    ok = np.isfinite(table["RECON_RCHI2"].to_numpy())
    scores = ensemble.score(
        np.stack(table.loc[ok, "LATENT"].to_numpy()).reshape(int(ok.sum()), -1),
        stats_matrix(table.loc[ok]),
        table.loc[ok, "SNR_MEDIAN"].to_numpy(),
        seen=table.loc[ok, "VAE_TRAINED"].to_numpy(),
    )
    out = table.drop(columns=["LATENT"])
    for col in scores.columns:
        out[col] = np.nan
        out.loc[ok, col] = scores[col].to_numpy()
    out["P_VALUE"] = 1.0
    out.loc[ok, "P_VALUE"] = calibrator.pvalues(
        scores["ANOMALY_SCORE"].to_numpy(),
        out.loc[ok, "SNR_MEDIAN"].to_numpy(),
        out.loc[ok, "Z"].to_numpy(),
    )
    path = layout.scores(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out.to_parquet(tmp, index=False)
    return path


def train_checkpoint(
    layout: Layout,
    keys: list[str],
    config: VAEConfig | None = None,
    *,
    max_spectra: int | None = 200_000,
    resume: bool = True,
) -> Path:
    """Train the VAE on the train split of the cleaned shards of ``keys`` (at most
    ``max_spectra`` of them); returns ``layout.checkpoint``."""
    shards = [layout.cleaned(k) for k in keys]
    options = {"resume": resume, "max_spectra": max_spectra, "split": "train"}
    if ray.is_initialized():
        return train_on_ray(shards, layout.model_dir, config, **options)
    return train_vae(shards, layout.model_dir, config, **options)


def encode_partitions(
    layout: Layout, keys: list[str], checkpoint: Path | None = None
) -> list[EncodeResult]:
    """Latents of the cleaned shards of ``keys``; partitions already encoded with this checkpoint
    are skipped and a failing partition yields an error result for it alone."""
    checkpoint = checkpoint or layout.checkpoint
    shards = [layout.cleaned(k) for k in keys]
    if ray.is_initialized():
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return encode_shards_on_ray(checkpoint, shards, layout.root, num_actors=actors)
    vae = load_checkpoint(checkpoint)
    return [encode_partition(vae, shard, layout.root) for shard in shards]


def scored_spectra(layout: Layout, keys: list[str]) -> pd.DataFrame:
    """Scores of every spectrum of ``keys`` with Q_VALUE: Benjamini-Hochberg over all of them."""
    frames = [pd.read_parquet(layout.scores(k)) for k in keys]
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if scores.empty:
        raise DesiAnomalyError(f"no scored spectra in {len(keys)} partition(s) under {layout.root}")
    scores["Q_VALUE"] = benjamini_hochberg(scores["P_VALUE"].to_numpy()).qvalues
    return scores


def _latents_of(layout: Layout, rows: pd.DataFrame) -> np.ndarray:
    """(len(rows), dim) latents of the (PARTITION, TARGETID) rows, in the order of ``rows``."""
    parts = []
    for key, group in rows.groupby("PARTITION", sort=False):
        table = pq.read_table(layout.latents(str(key)), columns=["TARGETID", "LATENT"])
        position = pd.Index(table["TARGETID"].to_numpy()).get_indexer(group["TARGETID"])
        latent = np.stack(table["LATENT"].to_numpy(zero_copy_only=False))
        parts.append(pd.DataFrame(latent[position], index=group.index))
    return pd.concat(parts).loc[rows.index].to_numpy(np.float32)


def _reconstructions(
    layout: Layout, vae: TrainedVAE, rows: pd.DataFrame
) -> Iterator[tuple[pd.DataFrame, Reconstructions]]:
    """Per partition: the (PARTITION, TARGETID) rows and their reconstructions, in row order."""
    for key, group in rows.groupby("PARTITION", sort=False):
        rec = reconstruct(vae, read_shard(layout.cleaned(str(key))), group["TARGETID"].to_numpy())
        order = pd.Index(rec.targetid).get_indexer(group["TARGETID"])
        yield (
            group,
            Reconstructions(
                rec.targetid[order], rec.wave, rec.flux[order], rec.ivar[order], rec.model[order]
            ),
        )


def cluster_anomalies(
    layout: Layout,
    keys: list[str],
    *,
    alpha: float = DEFAULT_ALPHA,
    n_reference: int = 2000,
    min_cluster_size: int = 20,
    seed: int = 0,
) -> AnomalyTypes:
    """Types of the spectra with q < ``alpha``: UMAP + HDBSCAN with a reference sample of the
    others, clusters named by rules. Writes ``layout.clusters`` and ``layout.cluster_summary``."""
    scores = scored_spectra(layout, keys)
    significant = scores[scores["Q_VALUE"] < alpha]
    normal = scores[scores["Q_VALUE"] >= alpha]
    reference = normal.sample(min(n_reference, len(normal)), random_state=seed)
    vae = load_checkpoint(layout.checkpoint)
    npix = vae.config.npix
    residuals = np.zeros((len(significant), npix), dtype=np.float32)
    coverage = np.zeros((len(significant), npix), dtype=bool)
    position = pd.Series(np.arange(len(significant)), index=significant.index)
    for group, rec in _reconstructions(layout, vae, significant):
        rows = position[group.index].to_numpy()
        residuals[rows], coverage[rows] = rec.residual, rec.ivar > 0
    types = find_anomaly_types(
        _latents_of(layout, significant) if len(significant) else np.zeros((0, 1)),
        _latents_of(layout, reference) if len(reference) else np.zeros((0, 1)),
        residuals,
        significant.reset_index(drop=True),
        RestFrameGrid.from_dict(vae.grid).centres,
        coverage=coverage,
        features_ref=scores.sample(min(20_000, len(scores)), random_state=seed),
        min_cluster_size=min_cluster_size,
        seed=seed,
    )
    assignments = pd.concat(
        [significant[["TARGETID", "PARTITION"]].reset_index(drop=True), types.assignments], axis=1
    )
    for frame, path in ((assignments, layout.clusters), (types.clusters, layout.cluster_summary)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    return types


@dataclass
class CatalogResult:
    """The catalog and where its outputs are (``paths``: see ``write_outputs``, plus
    ``regions`` and ``reconstructions``)."""

    catalog: pd.DataFrame
    paths: dict[str, Path]
    plots: list[Path]


def write_catalog(
    layout: Layout,
    keys: list[str],
    *,
    alpha: float = DEFAULT_ALPHA,
    known: pd.DataFrame | None = None,
    n_plots: int = 20,
) -> CatalogResult:
    """Build the ranked catalog and its evidence under ``layout.catalog_dir``.

    ``known``: TARGETID, KNOWN_TYPE, KNOWN_NAME of spectra matched to a known-anomaly list. Writes
    scores/catalog outputs (``write_outputs``), ``regions.parquet`` (the wavelength regions driving
    each catalogued spectrum's residual), ``reconstructions.parquet`` (TARGETID, rest-frame MODEL
    and RESIDUAL of each), and PNG plots of the ``n_plots`` top-ranked anomalies.
    """
    scores = scored_spectra(layout, keys)
    clusters = (
        pd.read_parquet(layout.clusters, columns=["TARGETID", "CLUSTER", "TYPE"])
        if layout.clusters.exists()
        else pd.DataFrame({"TARGETID": [], "CLUSTER": [], "TYPE": []})
    )
    if known is not None:
        from desi_anomaly.validation.known import merge_known  # validation imports this module

        clusters = merge_known(clusters, known)
    vae = load_checkpoint(layout.checkpoint)
    catalog = build_catalog(scores, clusters, alpha=alpha, checkpoint_sha256=vae.sha256)
    out = layout.catalog_dir
    out.mkdir(parents=True, exist_ok=True)

    regions, evidence, top = [], [], []
    for group, rec in _reconstructions(layout, vae, catalog):
        explained = explain_catalog(group, rec.targetid, rec.wave, rec.flux, rec.ivar, rec.model)
        regions.append(regions_table(explained))
        evidence.append(_evidence_table(rec))
        top.extend(e for e in explained if e.info["RANK"] <= n_plots)
    paths = write_outputs(
        out,
        scores,
        catalog,
        provenance={"alpha": alpha, "checkpoint_sha256": vae.sha256, "n_partitions": len(keys)},
    )
    paths["regions"] = out / "regions.parquet"
    paths["reconstructions"] = out / "reconstructions.parquet"
    with atomic_path(paths["regions"]) as tmp:
        (pd.concat(regions) if regions else regions_table([])).to_parquet(tmp, index=False)
    schema = _evidence_schema(vae.config.npix)
    with atomic_path(paths["reconstructions"]) as tmp:
        pq.write_table(pa.concat_tables([schema.empty_table(), *evidence]), tmp)
    top.sort(key=lambda e: e.info["RANK"])
    plots = plot_top_anomalies(top, out / "plots") if top else []
    return CatalogResult(catalog, paths, plots)


def _evidence_schema(npix: int) -> pa.Schema:
    return pa.schema(
        [
            ("TARGETID", pa.int64()),
            ("MODEL", pa.list_(pa.float32(), npix)),
            ("RESIDUAL", pa.list_(pa.float32(), npix)),
        ]
    )


def _evidence_table(rec: Reconstructions) -> pa.Table:
    npix = rec.model.shape[1]
    return pa.table(
        {
            "TARGETID": pa.array(rec.targetid, pa.int64()),
            "MODEL": pa.FixedSizeListArray.from_arrays(
                pa.array(rec.model.astype(np.float32).ravel()), npix
            ),
            "RESIDUAL": pa.FixedSizeListArray.from_arrays(
                pa.array(rec.residual.astype(np.float32).ravel()), npix
            ),
        },
        schema=_evidence_schema(npix),
    )
