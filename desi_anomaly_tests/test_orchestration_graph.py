"""The whole asset graph materialised through Dagster on a mock drop (``run_all``), with a tiny VAE
on a local Ray runtime: outputs, metadata, asset checks passing and failing, identical reruns,
and a new checkpoint marking latents stale until ``rescore_all`` runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import ray
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from desi_anomaly.orchestration.assets import ASSETS, PARTITIONS_NAME
from desi_anomaly.orchestration.definitions import build_definitions
from desi_anomaly.orchestration.resources import (
    DataRootResource,
    LoopbackRay,
    PipelineSettings,
    StorageResource,
)
from desi_anomaly.orchestration.run import run_all
from desi_anomaly.orchestration.sensors import range_tags, rescore_after_new_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::dagster.BetaWarning")]

#: A VAE small enough to train in seconds on the default 4000-pixel grid.
TINY = {"vae_epochs": 2, "vae_channels": [4, 8, 8, 16, 16, 16, 16], "vae_latent_dim": 16}


@pytest.fixture(scope="module")
def graph_drop(tmp_path_factory) -> Path:
    """4 healpix files of 180 QSOs: enough train-split spectra for the detector ensemble."""
    from desi_anomaly.mock import generate_drop

    root = tmp_path_factory.mktemp("graph-drop")
    generate_drop(root, 4, 180, seed=11, others_per_tile=60, anomaly_fraction=0.1)
    return root


@pytest.fixture(scope="module")
def pipeline(graph_drop, tmp_path_factory):
    out = tmp_path_factory.mktemp("graph-out")
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        result = run_all(
            graph_drop,
            out,
            settings=PipelineSettings(**TINY),
            ray_cluster=LoopbackRay(num_cpus=1),
            instance=instance,
            echo=lines.append,
        )
        yield instance, out, result, lines


def _resources(data: Path, out: Path, **settings) -> dict:
    return {
        "data_root": DataRootResource(root=str(data)),
        "storage": StorageResource(root=str(out)),
        "ray_cluster": LoopbackRay(num_cpus=1),
        "settings": PipelineSettings(**{**TINY, **settings}),
    }


def _latest(instance, asset: str, partition: str | None = None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None
        ),
        limit=1,
    ).records
    assert records, f"{asset} {partition or ''} was never materialised"
    return records[0].asset_materialization


def _checks(instance, run_id: str) -> dict[str, dg.AssetCheckEvaluation]:
    out = {}
    for record in instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        out[evaluation.check_name] = evaluation
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_all_materialises_every_asset(pipeline):
    instance, out, result, lines = pipeline
    assert result.success, lines
    assert len(result.partitions) == 4 and not result.failed
    for name in ("scores.parquet", "catalog.parquet", "catalog.fits", "catalog.duckdb"):
        assert (out / name).is_file(), name
    assert set(result.outputs) == {"scores", "catalog_parquet", "catalog_fits", "duckdb"}
    scores = pd.read_parquet(out / "scores.parquet")
    assert 0 < len(scores) <= 720 and scores["TARGETID"].is_unique
    for asset in ("raw_spectra", "cleaned_spectra", "latents", "anomaly_scores"):
        for key in result.partitions:
            _latest(instance, asset, key)
    for asset in ("vae_checkpoint", "anomaly_detector", "anomaly_clusters", "anomaly_catalog"):
        _latest(instance, asset)
    injection = _latest(instance, "injection_recovery")
    assert injection.metadata["n_injected"].value > 0
    assert "| ensemble | bal |" in injection.metadata["overall"].value
    assert (out / "validation" / "injection_recovery.parquet").is_file()
    text, catalog = "\n".join(lines), pd.read_parquet(out / "catalog.parquet")
    if catalog.empty:  # then the best candidates are shown, marked as not significant
        assert "no significant anomalies" in text and "not discoveries" in text
        assert str(scores.nlargest(1, "ANOMALY_SCORE")["TARGETID"].iloc[0]) in text
    else:
        assert f"{len(catalog)} anomalies; top" in text
    assert not ray.is_initialized()  # the local Ray runtime was shut down


def test_metadata_and_data_versions(pipeline):
    instance, out, result, _ = pipeline
    ckpt = out / "model" / "vae_checkpoint.pt"
    vae = _latest(instance, "vae_checkpoint")
    assert vae.tags["dagster/data_version"] == _sha256(ckpt)
    assert "data:image/png;base64," in vae.metadata["loss_curve"].value
    assert vae.metadata["epochs"].value == 2
    key = result.partitions[0]
    latents = _latest(instance, "latents", key)
    assert latents.metadata["checkpoint_sha256"].value == _sha256(ckpt)
    assert latents.tags["dagster/input_data_version/vae_checkpoint"] == _sha256(ckpt)
    catalog = _latest(instance, "anomaly_catalog")
    assert catalog.metadata["preview"].value.startswith("| RANK | TARGETID")
    assert catalog.metadata["outputs"].value["catalog_fits"].endswith("catalog.fits")
    cleaned = _latest(instance, "cleaned_spectra", key)
    assert "low_snr" in cleaned.metadata["drop_reasons"].value


def test_catalog_checks_pass_and_fail_when_they_should(pipeline, graph_drop, tmp_path):
    instance, out, result, _ = pipeline
    checks = _checks(instance, result.run_ids[-1])
    assert checks["targetids_unique"].passed
    assert checks["qvalues_monotone_in_rank"].passed
    assert checks["latents_finite"].passed and checks["scores_valid"].passed
    assert checks["pvalue_uniformity"].passed
    assert checks["reconstruction_accuracy"].metadata["n_held_out_normal"].value > 0

    def rerun_catalog(**settings):
        run = dg.materialize(
            ASSETS,
            selection=["anomaly_catalog"],
            instance=instance,
            resources=_resources(graph_drop, out, **settings),
        )
        return _checks(instance, run.run_id)["reconstruction_accuracy"]

    assert not rerun_catalog(recon_rchi2_max=0.0).passed  # nothing has chi2/pixel < 0
    assert rerun_catalog(recon_rchi2_max=1e9, recon_min_share=0.95).passed

    # A known-anomaly list (RA, DEC, TYPE, NAME) is cross-matched with the scored spectra.
    scores = pd.read_parquet(out / "scores.parquet").head(3)
    known = tmp_path / "known.csv"
    pd.DataFrame(
        {
            "RA": scores["TARGET_RA"],
            "DEC": scores["TARGET_DEC"],
            "TYPE": "BAL",
            "NAME": [f"J{i}" for i in range(3)],
        }
    ).to_csv(known, index=False)
    rerun_catalog(known_anomalies=str(known))
    catalog = _latest(instance, "anomaly_catalog")
    assert catalog.metadata["known_anomalies_matched"].value == 3


def test_rerun_gives_identical_outputs(pipeline, graph_drop):
    instance, out, _, _ = pipeline
    before = {name: pd.read_parquet(out / name) for name in ("scores.parquet", "catalog.parquet")}
    ckpt_sha = _sha256(out / "model" / "vae_checkpoint.pt")
    again = run_all(
        graph_drop,
        out,
        settings=PipelineSettings(**TINY),
        ray_cluster=LoopbackRay(num_cpus=1),
        instance=instance,
        echo=lambda line: None,
    )
    assert again.success
    assert _sha256(out / "model" / "vae_checkpoint.pt") == ckpt_sha
    for name, frame in before.items():
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), frame)


def test_new_checkpoint_marks_latents_stale_until_rescore_all(pipeline, graph_drop):
    instance, out, result, _ = pipeline
    defs = build_definitions(_resources(graph_drop, out, vae_seed=1))
    key = result.partitions[0]

    def status(asset: str) -> StaleStatus:
        resolver = get_stale_status_resolver(instance, ASSETS)
        return resolver.get_status(dg.AssetKey(asset), key)

    assert status("latents") == StaleStatus.FRESH
    new = dg.materialize(
        ASSETS,
        selection=["vae_checkpoint"],
        instance=instance,
        resources=_resources(graph_drop, out, vae_seed=1),
    )
    assert new.success
    assert status("latents") == StaleStatus.STALE
    # The asset sensor asks for rescore_all over every partition, as one range.
    tick = rescore_after_new_checkpoint.evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs)
    )
    (request,) = tick.run_requests
    assert range_tags(instance).items() <= request.tags.items()
    registered = instance.get_dynamic_partitions(PARTITIONS_NAME)
    assert request.tags["dagster/asset_partition_range_start"] == registered[0]
    assert request.tags["dagster/asset_partition_range_end"] == registered[-1]
    rescore = defs.resolve_job_def("rescore_all").execute_in_process(
        instance=instance, tags=request.tags
    )
    assert rescore.success
    assert status("latents") == StaleStatus.FRESH
    assert status("anomaly_scores") == StaleStatus.FRESH
    ckpt_sha = _sha256(out / "model" / "vae_checkpoint.pt")
    for k in instance.get_dynamic_partitions(PARTITIONS_NAME):
        assert _latest(instance, "latents", k).metadata["checkpoint_sha256"].value == ckpt_sha


def test_run_all_leaves_a_corrupt_partition_out(small_drop, tmp_path):
    """A truncated coadd fails its own ingest run with the file named; the others go on."""
    import shutil

    from desi_anomaly.io.partitions import discover

    data = tmp_path / "data"
    shutil.copytree(small_drop, data)
    bad = discover(data).complete[0]
    raw = bad.coadd.read_bytes()
    bad.coadd.write_bytes(raw[: len(raw) // 2])
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        result = run_all(
            data,
            tmp_path / "out",
            settings=PipelineSettings(**TINY),
            ray_cluster=LoopbackRay(num_cpus=1),
            instance=instance,
            echo=lines.append,
        )
        assert list(result.failed) == [str(bad.key)]
        assert str(bad.coadd) in result.failed[str(bad.key)]
        assert str(bad.key) not in instance.get_dynamic_partitions(PARTITIONS_NAME)
        good = [k for k in result.partitions if k != str(bad.key)]
        for key in good:
            assert (tmp_path / "out" / "cleaned" / f"{key}.parquet").is_file()
        assert not result.success  # a partition failed (and 2 small files are too few to score)
    assert any("FAILED" in line and str(bad.coadd) in line for line in lines)
