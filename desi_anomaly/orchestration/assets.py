"""The software-defined assets: a thin layer naming each stage of ``desi_anomaly.discovery`` and
recording what it produced.

Partitioned assets (one dynamic partition per healpix coadd, key ``{survey}-{program}-{healpix}``)
hold one file per partition under the storage root. Global assets read the partition files from
storage directly (never through an IO manager) and every asset returns a ``MaterializeResult``
with metadata, not data. Data versions: ``raw_spectra`` is versioned by the SHA-256 of its files,
``vae_checkpoint`` by the SHA-256 of the checkpoint and ``anomaly_detector`` by that of the fitted
detector, so a new checkpoint marks every ``latents``/``anomaly_scores`` partition stale.
"""

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
from dagster_ray import RayResource

from desi_anomaly import __version__, discovery
from desi_anomaly.errors import DesiAnomalyError

from .checks import (
    CATALOG_CHECKS,
    CLEANED_CHECKS,
    LATENTS_CHECKS,
    SCORES_CHECKS,
    catalog_check_results,
    cleaned_check_results,
    latents_check_results,
    scores_check_results,
)
from .metadata import (
    combined_version,
    drop_table,
    file_record,
    file_sha256,
    loss_curve_markdown,
    markdown_table,
    path_value,
    png_markdown,
)
from .resources import DataRootResource, PipelineSettings, StorageResource

# backfill_policy is "beta" in Dagster 1.13; the multi-run policy is a deliberate choice here.
warnings.filterwarnings(
    "ignore", message="Parameter `backfill_policy` of function `asset`", category=dg.BetaWarning
)

PARTITIONS_NAME = "healpix"
healpix_partitions = dg.DynamicPartitionsDefinition(name=PARTITIONS_NAME)
#: Partitions per run when a backfill covers many partitions (``DESI_ANOMALY_PARTITIONS_PER_RUN``).
PARTITIONS_PER_RUN = int(os.environ.get("DESI_ANOMALY_PARTITIONS_PER_RUN", "25"))
backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN)
OWNERS = ["team:desi-anomaly"]
#: Required HDUs of a DESI healpix coadd and redrock file.
COADD_HDUS = (
    "FIBERMAP",
    "EXP_FIBERMAP",
    *(f"{arm}_{part}" for arm in "BRZ" for part in ("WAVELENGTH", "FLUX", "IVAR", "MASK")),
)
REDROCK_HDUS = ("REDSHIFTS",)


def _code_version(stage: int) -> str:
    return f"{__version__}-{stage}"


def _fail(what: str, errors: dict[str, str]) -> dg.Failure:
    """A Failure whose description names each failed partition and its file problem."""
    lines = [f"{key}: {msg}" for key, msg in sorted(errors.items())]
    return dg.Failure(
        description=f"{what} failed for {len(errors)} partition(s):\n" + "\n".join(lines),
        metadata={"failed_partitions": dg.MetadataValue.json(dict(sorted(errors.items())))},
        allow_retries=False,
    )


def registered_keys(instance: dg.DagsterInstance) -> list[str]:
    """Every registered healpix partition key, sorted."""
    return sorted(instance.get_dynamic_partitions(PARTITIONS_NAME))


def keys_with(
    context: dg.AssetExecutionContext, path_for: Callable[[str], Path], *, what: str
) -> list[str]:
    """Registered partitions whose file ``path_for(key)`` exists; Failure if there are none."""
    keys = [k for k in registered_keys(context.instance) if path_for(k).is_file()]
    if not keys:
        raise dg.Failure(description=f"no partition has {what} yet: materialise it first")
    return keys


def _partition_meta(keys: list[str]) -> dict[str, dg.MetadataValue]:
    return {"partitions": dg.MetadataValue.int(len(keys))}


# --------------------------------------------------------------------------------------------
# Ingest: raw files -> cleaned shards (one per partition)


def validate_pair(files) -> dict[str, int]:
    """Open both files of a partition and check their HDUs and row counts; DesiFormatError names
    the file and the problem."""
    from desi_anomaly.errors import DesiFormatError
    from desi_anomaly.io.fitsutil import open_fits, require_hdus

    with open_fits(files.coadd) as fits:
        require_hdus(fits, files.coadd, COADD_HDUS)
        n_coadd = fits["FIBERMAP"].get_nrows()
        for arm in "BRZ":
            dims = fits[f"{arm}_FLUX"].get_dims()
            if len(dims) != 2 or dims[0] != n_coadd:
                raise DesiFormatError(
                    files.coadd, f"{arm}_FLUX has shape {dims}, FIBERMAP has {n_coadd} rows"
                )
    with open_fits(files.redrock) as fits:
        require_hdus(fits, files.redrock, REDROCK_HDUS)
        n_redrock = fits["REDSHIFTS"].get_nrows()
    if n_redrock != n_coadd:
        raise DesiFormatError(
            files.redrock, f"{n_redrock} REDSHIFTS rows but the coadd has {n_coadd} targets"
        )
    return {"n_targets": int(n_coadd)}


@dg.asset(
    partitions_def=healpix_partitions,
    group_name="ingest",
    kinds={"fits"},
    owners=OWNERS,
    code_version=_code_version(1),
    backfill_policy=backfill_policy,
    description=(
        "DESI healpix coadd + redrock files of one partition in the data root: recorded (path, "
        "size, mtime, SHA-256) and validated (HDUs present, row counts agree). Data version: the "
        "files' SHA-256."
    ),
)
def raw_spectra(context: dg.AssetExecutionContext, data_root: DataRootResource):
    from desi_anomaly.io.partitions import partition_files

    records, errors = {}, {}
    for key in context.partition_keys:
        files = partition_files(data_root.path, key)
        if files is None:
            errors[key] = f"no complete coadd + redrock pair under {data_root.path}"
            continue
        try:
            counts = validate_pair(files)
        except DesiAnomalyError as exc:
            errors[key] = str(exc)
            continue
        records[key] = {
            "coadd": file_record(files.coadd),
            "redrock": file_record(files.redrock),
            **counts,
        }
    if errors:
        raise _fail("validating the raw files", errors)
    rows = [
        (key, role, rec[role]["path"], rec[role]["size"], rec[role]["sha256"][:16])
        for key, rec in records.items()
        for role in ("coadd", "redrock")
    ]
    metadata = {
        **_partition_meta(list(records)),
        "files": dg.MetadataValue.md(
            markdown_table(("partition", "file", "path", "bytes", "sha256[:16]"), rows)
        ),
        "n_targets": dg.MetadataValue.int(sum(r["n_targets"] for r in records.values())),
        "records": dg.MetadataValue.json(records),
    }
    if len(records) == 1:
        (rec,) = records.values()
        metadata["coadd"] = path_value(rec["coadd"]["path"])
        metadata["redrock"] = path_value(rec["redrock"]["path"])
    version = combined_version(
        f"{k}:{r['coadd']['sha256']}:{r['redrock']['sha256']}" for k, r in records.items()
    )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


@dg.asset(
    partitions_def=healpix_partitions,
    deps=[raw_spectra],
    group_name="ingest",
    kinds={"parquet"},
    owners=OWNERS,
    code_version=_code_version(1),
    backfill_policy=backfill_policy,
    check_specs=CLEANED_CHECKS,
    description=(
        "QSO spectra of one partition selected, arm-merged and preprocessed onto the rest-frame "
        "grid: one Parquet shard (FLUX/IVAR/COVERAGE + metadata + line features), with every "
        "dropped spectrum and its reason in the shard's metadata."
    ),
)
def cleaned_spectra(
    context: dg.AssetExecutionContext,
    data_root: DataRootResource,
    storage: StorageResource,
    settings: PipelineSettings,
):
    from desi_anomaly.ingest import clean_partition
    from desi_anomaly.io.coadd import DesiDataWarning
    from desi_anomaly.io.partitions import partition_files

    results, errors = [], {}
    for key in context.partition_keys:
        files = partition_files(data_root.path, key)
        if files is None:
            errors[key] = f"no complete coadd + redrock pair under {data_root.path}"
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DesiDataWarning)
                results.append(clean_partition(files, storage.root))
        except DesiAnomalyError as exc:
            errors[key] = str(exc)
            continue
        for w in caught:
            if issubclass(w.category, DesiDataWarning):
                context.log.warning(f"{key}: {w.message}")
    if errors:
        raise _fail("cleaning", errors)
    n_read = sum(r.n_read for r in results)
    n_kept = sum(r.n_kept for r in results)
    drops: dict[str, int] = {}
    for r in results:
        for reason, count in r.drop_counts.items():
            drops[reason] = drops.get(reason, 0) + int(count)
    metadata = {
        **_partition_meta([r.key for r in results]),
        "dagster/row_count": dg.MetadataValue.int(n_kept),
        "n_read": dg.MetadataValue.int(n_read),
        "n_kept": dg.MetadataValue.int(n_kept),
        "n_dropped": dg.MetadataValue.int(n_read - n_kept),
        "drop_reasons": dg.MetadataValue.md(drop_table(n_read, drops)),
        "seconds": dg.MetadataValue.float(sum(r.seconds for r in results)),
    }
    if len(results) == 1:
        metadata["shard"] = path_value(results[0].shard)
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=cleaned_check_results(results, n_read, drops, settings),
    )


# --------------------------------------------------------------------------------------------
# Model: VAE checkpoint (global) -> latents (per partition) -> detector (global)


@dg.asset(
    deps=[cleaned_spectra],
    group_name="model",
    kinds={"pytorch", "ray"},
    pool="ray",
    owners=OWNERS,
    code_version=_code_version(6),
    description=(
        "The spectral VAE trained (through Ray) on the train split of every cleaned shard: "
        "model/vae_checkpoint.pt. Data version: the checkpoint's SHA-256, so a new checkpoint "
        "marks every latents and anomaly_scores partition stale."
    ),
)
def vae_checkpoint(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    settings: PipelineSettings,
    ray_cluster: RayResource,  # connected for the step: training runs as a Ray task
):
    from desi_anomaly.ml.training import CheckpointMismatchError, load_checkpoint

    layout = storage.layout
    keys = keys_with(context, layout.cleaned, what="a cleaned shard")
    config = settings.vae_config()
    context.log.info(f"training on {len(keys)} partitions with {config}")
    try:
        try:
            path = discovery.train_checkpoint(
                layout, keys, config, max_spectra=settings.max_train_spectra
            )
        except CheckpointMismatchError as exc:
            # Another config or other shards than the saved checkpoint: train from scratch.
            context.log.info(f"starting over: {exc}")
            path = discovery.train_checkpoint(
                layout, keys, config, max_spectra=settings.max_train_spectra, resume=False
            )
    except DesiAnomalyError as exc:
        raise dg.Failure(description=f"training failed: {exc}") from exc
    trained = load_checkpoint(path)
    history = trained.history
    metadata = {
        **_partition_meta(keys),
        "checkpoint": path_value(path),
        "sha256": dg.MetadataValue.text(trained.sha256),
        "config": dg.MetadataValue.json(trained.config.to_dict()),
        "epochs": dg.MetadataValue.int(len(history)),
    }
    if history:
        metadata["loss_curve"] = dg.MetadataValue.md(loss_curve_markdown(history))
        metadata["best_val_loss"] = dg.MetadataValue.float(
            float(min(h.get("val_loss", np.inf) for h in history))
        )
        metadata["history"] = dg.MetadataValue.json(
            [{k: float(v) for k, v in h.items()} for h in history]
        )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(trained.sha256))


@dg.asset(
    partitions_def=healpix_partitions,
    deps=[cleaned_spectra, vae_checkpoint],
    group_name="model",
    kinds={"parquet", "ray"},
    pool="ray",
    owners=OWNERS,
    code_version=_code_version(6),
    backfill_policy=backfill_policy,
    check_specs=LATENTS_CHECKS,
    description=(
        "Latent vectors (posterior means) and reconstruction chi2 of every cleaned spectrum of a "
        "partition, encoded through a Ray actor pool with the current checkpoint."
    ),
)
def latents(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    ray_cluster: RayResource,  # connected for the step: encoding runs on a Ray actor pool
):
    layout = storage.layout
    if not layout.checkpoint.is_file():
        raise dg.Failure(
            description=f"no checkpoint at {layout.checkpoint}: materialise vae_checkpoint"
        )
    keys = list(context.partition_keys)
    results = discovery.encode_partitions(layout, keys, layout.checkpoint)
    errors = {r.key: r.error for r in results if not r.ok}
    if errors:
        raise _fail("encoding", errors)
    n = sum(r.n_spectra for r in results)
    metadata = {
        **_partition_meta(keys),
        "dagster/row_count": dg.MetadataValue.int(n),
        "checkpoint_sha256": dg.MetadataValue.text(file_sha256(layout.checkpoint)),
        "skipped_already_encoded": dg.MetadataValue.int(sum(bool(r.skipped) for r in results)),
    }
    if len(results) == 1:
        metadata["latents"] = path_value(layout.latents(keys[0]))
    return dg.MaterializeResult(
        metadata=metadata, check_results=latents_check_results(layout, keys)
    )


def _detector_version(layout) -> str:
    return combined_version([file_sha256(layout.detector), file_sha256(layout.calibrator)])


@dg.asset(
    deps=[latents],
    group_name="model",
    kinds={"scikitlearn"},
    owners=OWNERS,
    code_version=_code_version(6),
    description=(
        "Detector ensemble fitted on the train-split latents of every partition encoded with the "
        "current checkpoint (tail probabilities against the reference split), and the conformal "
        "calibrator (S/N x z strata) fitted on the calibration split. Data version: SHA-256 of "
        "both files."
    ),
)
def anomaly_detector(
    context: dg.AssetExecutionContext, storage: StorageResource, settings: PipelineSettings
):
    from desi_anomaly.ml.encoding import read_latents_info

    layout = storage.layout
    if not layout.checkpoint.is_file():
        raise dg.Failure(description=f"no checkpoint at {layout.checkpoint}")
    sha = file_sha256(layout.checkpoint)
    keys = keys_with(context, layout.latents, what="latents")
    current = [
        k
        for k in keys
        if (read_latents_info(layout.latents(k)) or {}).get("checkpoint_sha256") == sha
    ]
    if len(current) < len(keys):
        context.log.warning(
            f"{len(keys) - len(current)} partition(s) have latents from another checkpoint and "
            "are left out: re-materialise their latents"
        )
    if not current:
        raise dg.Failure(description="no latents from the current checkpoint: materialise latents")
    try:
        discovery.fit_detector(layout, current, alpha=settings.alpha)
    except DesiAnomalyError as exc:
        raise dg.Failure(description=f"fitting the detector failed: {exc}") from exc
    metadata = {
        **_partition_meta(current),
        "detector": path_value(layout.detector),
        "calibrator": path_value(layout.calibrator),
        "checkpoint_sha256": dg.MetadataValue.text(sha),
    }
    return dg.MaterializeResult(
        metadata=metadata, data_version=dg.DataVersion(_detector_version(layout))
    )


# --------------------------------------------------------------------------------------------
# Discovery: scores (per partition) -> clusters -> catalog


def load_detector(layout):
    from desi_anomaly.ml.detectors import AnomalyEnsemble
    from desi_anomaly.ml.significance import ConformalCalibrator

    if not (layout.detector.is_file() and layout.calibrator.is_file()):
        raise dg.Failure(
            description=f"no fitted detector in {layout.model_dir}: materialise anomaly_detector"
        )
    return AnomalyEnsemble.load(layout.detector), ConformalCalibrator.load(layout.calibrator)


@dg.asset(
    partitions_def=healpix_partitions,
    deps=[latents, anomaly_detector],
    group_name="discovery",
    kinds={"parquet"},
    owners=OWNERS,
    code_version=_code_version(6),
    backfill_policy=backfill_policy,
    check_specs=SCORES_CHECKS,
    description=(
        "Anomaly score (detector ensemble + reconstruction chi2), its components and the "
        "conformal p-value of every spectrum of a partition."
    ),
)
def anomaly_scores(context: dg.AssetExecutionContext, storage: StorageResource):
    layout = storage.layout
    ensemble, calibrator = load_detector(layout)
    paths, errors = [], {}
    for key in context.partition_keys:
        try:
            paths.append(discovery.score_partition(layout, key, ensemble, calibrator))
        except (DesiAnomalyError, OSError) as exc:
            errors[key] = str(exc)
    if errors:
        raise _fail("scoring", errors)
    n = sum(pq.read_metadata(p).num_rows for p in paths)
    metadata = {
        **_partition_meta(list(context.partition_keys)),
        "dagster/row_count": dg.MetadataValue.int(n),
    }
    if len(paths) == 1:
        metadata["scores"] = path_value(paths[0])
    return dg.MaterializeResult(metadata=metadata, check_results=scores_check_results(paths))


@dg.asset(
    deps=[anomaly_scores],
    group_name="discovery",
    kinds={"parquet"},
    owners=OWNERS,
    code_version=_code_version(6),
    description=(
        "Benjamini-Hochberg q-values over every scored spectrum; the significant anomalies "
        "(q < alpha) embedded with UMAP, clustered with HDBSCAN and named by rule (BAL-like, red "
        "continuum, weak-line, artefact, ...)."
    ),
)
def anomaly_clusters(
    context: dg.AssetExecutionContext, storage: StorageResource, settings: PipelineSettings
):
    layout = storage.layout
    keys = keys_with(context, layout.scores, what="anomaly scores")
    try:
        discovery.cluster_anomalies(layout, keys, alpha=settings.alpha)
    except DesiAnomalyError as exc:
        raise dg.Failure(description=f"clustering failed: {exc}") from exc
    metadata = {**_partition_meta(keys), "clusters": path_value(layout.clusters)}
    if layout.clusters.is_file():
        table = pq.read_table(layout.clusters).to_pandas()
        metadata["dagster/row_count"] = dg.MetadataValue.int(len(table))
        if "TYPE" in table:
            counts = table["TYPE"].astype(str).value_counts()
            metadata["types"] = dg.MetadataValue.md(
                markdown_table(("type", "anomalies"), counts.items())
            )
    return dg.MaterializeResult(metadata=metadata)


def known_matches(path: str, layout, keys: list[str]):
    """TARGETID, KNOWN_TYPE, KNOWN_NAME of the scored spectra within the match radius of an entry
    of a known-anomaly list (any format ``desi_anomaly.validation.read_known_anomalies`` reads:
    RA/DEC plus type and name columns)."""
    import pandas as pd

    from desi_anomaly.validation import crossmatch_known, read_known_anomalies

    known = read_known_anomalies(path)
    cols = ["TARGETID", "TARGET_RA", "TARGET_DEC"]
    positions = pd.concat(
        [pd.read_parquet(layout.scores(k), columns=cols) for k in keys], ignore_index=True
    )
    matches = crossmatch_known(positions, known)
    return matches.loc[matches["KNOWN_TYPE"] != "", ["TARGETID", "KNOWN_TYPE", "KNOWN_NAME"]]


PREVIEW_COLUMNS = ("RANK", "TARGETID", "PARTITION", "Z", "ANOMALY_SCORE", "P_VALUE", "Q_VALUE")


def catalog_preview(catalog, n: int = 10) -> str:
    cols = [c for c in PREVIEW_COLUMNS if c in catalog.columns]
    cols += [c for c in ("TYPE", "FOLLOWUP_PRIORITY") if c in catalog.columns]
    return markdown_table(cols, catalog[cols].head(n).itertuples(index=False))


@dg.asset(
    deps=[anomaly_clusters],
    group_name="discovery",
    kinds={"parquet", "duckdb"},
    owners=OWNERS,
    code_version=_code_version(6),
    check_specs=CATALOG_CHECKS,
    description=(
        "The ranked anomaly catalog (TARGETID, healpix key, RA, DEC, Z, score, p, q, type, "
        "follow-up priority, provenance, line features) in Parquet, FITS and DuckDB, with the "
        "scores of every spectrum and plots of the top anomalies."
    ),
)
def anomaly_catalog(
    context: dg.AssetExecutionContext, storage: StorageResource, settings: PipelineSettings
):
    layout = storage.layout
    keys = keys_with(context, layout.scores, what="anomaly scores")
    try:
        known = (
            known_matches(settings.known_anomalies, layout, keys)
            if settings.known_anomalies
            else None
        )
        result = discovery.write_catalog(layout, keys, alpha=settings.alpha, known=known)
    except DesiAnomalyError as exc:
        raise dg.Failure(description=f"writing the catalog failed: {exc}") from exc
    paths = {name: Path(p) for name, p in result.paths.items()}
    if storage.duckdb_path and "duckdb" in paths:
        target = Path(storage.duckdb_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(paths["duckdb"], tmp)
        os.replace(tmp, target)
        paths["duckdb_published"] = target
    catalog = result.catalog
    n_disc = int((catalog["Q_VALUE"] < settings.alpha).sum()) if "Q_VALUE" in catalog else None
    metadata = {
        **_partition_meta(keys),
        "dagster/row_count": dg.MetadataValue.int(len(catalog)),
        "preview": dg.MetadataValue.md(catalog_preview(catalog)),
        **{name: path_value(p) for name, p in paths.items()},
        "outputs": dg.MetadataValue.json({k: str(v) for k, v in paths.items()}),
    }
    if n_disc is not None:
        metadata["discoveries"] = dg.MetadataValue.int(n_disc)
    if known is not None:
        metadata["known_anomalies_matched"] = dg.MetadataValue.int(len(known))
        metadata["known_anomalies_in_catalog"] = dg.MetadataValue.int(
            int(catalog["TARGETID"].isin(known["TARGETID"]).sum())
        )
    plots = [Path(p) for p in (getattr(result, "plots", None) or [])]
    if plots:
        metadata["top_anomalies"] = dg.MetadataValue.md(
            "\n\n".join(png_markdown(p, alt=p.stem) for p in plots[:3])
        )
        metadata["plots"] = dg.MetadataValue.json([str(p) for p in plots])
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=catalog_check_results(layout, keys, catalog, paths, settings),
    )


# --------------------------------------------------------------------------------------------
# Validation: injection-recovery on the partitions' own spectra


@dg.asset(
    deps=[vae_checkpoint, cleaned_spectra],
    group_name="validation",
    kinds={"parquet"},
    owners=OWNERS,
    code_version=_code_version(6),
    description=(
        "Injection-recovery: synthetic anomalies of every class injected into observed test-split "
        "spectra of the partitions (the detectors fitted on their train and reference splits, "
        "calibrated on their calibration split): AUROC and recall at q < alpha per class, S/N "
        "and z, for the ensemble and the PCA baseline, and the realised false-positive rate on "
        "null spectra."
    ),
)
def injection_recovery(
    context: dg.AssetExecutionContext,
    data_root: DataRootResource,
    storage: StorageResource,
    settings: PipelineSettings,
):
    from desi_anomaly.io.coadd import read_qso_spectra
    from desi_anomaly.io.partitions import partition_files
    from desi_anomaly.ml.training import load_checkpoint
    from desi_anomaly.mock import ANOMALY_KINDS
    from desi_anomaly.preprocess import PreprocessConfig, RestFrameGrid, preprocess
    from desi_anomaly.splits import assign_split
    from desi_anomaly.validation import (
        METHOD_COLUMNS,
        NO_ANOMALY,
        add_qvalues,
        concat_cleaned,
        concat_observed,
        fit_detectors,
        inject_and_score,
        recovery_table,
        take,
    )

    layout = storage.layout
    if not layout.checkpoint.is_file():
        raise dg.Failure(description=f"no checkpoint at {layout.checkpoint}")
    keys = keys_with(context, layout.cleaned, what="a cleaned shard")
    keys = keys[: settings.injection_max_partitions]
    vae = load_checkpoint(layout.checkpoint)
    config = PreprocessConfig(grid=RestFrameGrid.from_dict(vae.grid))
    train, reference, calib, test = [], [], [], []
    for key in keys:
        files = partition_files(data_root.path, key)
        if files is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spectra = read_qso_spectra(files.coadd, files.redrock)
        split = assign_split(spectra.targetid)
        train.append(preprocess(take(spectra, split == "train"), config))
        reference.append(preprocess(take(spectra, split == "reference"), config))
        calib.append(preprocess(take(spectra, split == "calibration"), config))
        test.append(take(spectra, split == "test"))
    try:
        det = fit_detectors(
            vae, concat_cleaned(train), concat_cleaned(reference), concat_cleaned(calib)
        )
        rng = np.random.default_rng(settings.injection_seed)
        scored = inject_and_score(
            det, concat_observed(test), list(ANOMALY_KINDS), rng, config=config
        )
    except DesiAnomalyError as exc:
        raise dg.Failure(description=f"injection-recovery failed: {exc}") from exc
    table = add_qvalues(scored.table, settings.alpha)
    recovery = recovery_table(table, METHOD_COLUMNS, alpha=settings.alpha)
    path = layout.root / "validation" / "injection_recovery.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    recovery.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    overall = recovery[(recovery["SNR_BIN"] == "all") & (recovery["Z_BIN"] == "all")]
    normal = table["ANOMALY"] == NO_ANOMALY
    null_rate = {  # (score, q-value[, p-value]) columns per method
        method: float((table.loc[normal, cols[1]] < settings.alpha).mean())
        for method, cols in METHOD_COLUMNS.items()
    }
    return dg.MaterializeResult(
        metadata={
            **_partition_meta(keys),
            "recovery_table": path_value(path),
            "n_injected": dg.MetadataValue.int(int((~normal).sum())),
            "n_null": dg.MetadataValue.int(int(normal.sum())),
            "overall": dg.MetadataValue.md(
                markdown_table(
                    ("method", "class", "injected", "AUROC", "recall (q < alpha)")
                    + (("recall (p < alpha)",) if "RECALL_P" in overall else ()),
                    overall[
                        ["METHOD", "ANOMALY", "N_INJECTED", "AUROC", "RECALL"]
                        + (["RECALL_P"] if "RECALL_P" in overall else [])
                    ].itertuples(index=False),
                )
            ),
            "null_false_positive_rate": dg.MetadataValue.json(null_rate),
        }
    )


ASSETS = [
    raw_spectra,
    cleaned_spectra,
    vae_checkpoint,
    latents,
    anomaly_detector,
    anomaly_scores,
    anomaly_clusters,
    anomaly_catalog,
    injection_recovery,
]
PARTITIONED_ASSETS = [raw_spectra, cleaned_spectra, latents, anomaly_scores]


def describe(obj) -> str:  # pragma: no cover - debugging helper
    return json.dumps(obj, default=str, indent=1)
