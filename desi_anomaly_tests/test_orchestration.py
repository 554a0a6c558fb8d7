"""The Dagster layer through Dagster's own machinery: definitions, resources from the environment,
partitioned ingest with checks and failure isolation, the new-data sensor and the stale-partition
backfill sensor, on small mock data drops."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from desi_anomaly.io.partitions import discover
from desi_anomaly.orchestration import sensors
from desi_anomaly.orchestration.assets import (
    ASSETS,
    PARTITIONED_ASSETS,
    PARTITIONS_NAME,
    cleaned_spectra,
    raw_spectra,
)
from desi_anomaly.orchestration.definitions import build_definitions
from desi_anomaly.orchestration.resources import (
    DataRootResource,
    LoopbackRay,
    PipelineSettings,
    RemoteRay,
    StorageResource,
    resources_from_env,
)

warnings_filter = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")
pytestmark = [warnings_filter]


@pytest.fixture
def drop(small_drop, tmp_path) -> Path:
    """A private copy of the small mock drop (3 partitions), free to change."""
    root = tmp_path / "data"
    shutil.copytree(small_drop, root)
    return root


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _resources(data: Path, out: Path, **settings) -> dict:
    return {
        "data_root": DataRootResource(root=str(data)),
        "storage": StorageResource(root=str(out)),
        "ray_cluster": LoopbackRay(num_cpus=1),
        "settings": PipelineSettings(**settings),
    }


def _keys(root: Path) -> list[str]:
    return [str(f.key) for f in discover(root).complete]


# --------------------------------------------------------------------------------------------
# Definitions and resources


def test_definitions_load_with_every_part():
    defs = build_definitions(_resources(Path("/nonexistent"), Path("/tmp/unused")))
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    names = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert names == {
        "raw_spectra",
        "cleaned_spectra",
        "vae_checkpoint",
        "latents",
        "anomaly_detector",
        "anomaly_scores",
        "anomaly_clusters",
        "anomaly_catalog",
        "injection_recovery",
    }
    for asset in ASSETS:
        for key in asset.keys:
            node = graph.get(key)
            assert node.group_name in {"ingest", "model", "discovery", "validation"}
            assert node.owners == ["team:desi-anomaly"]
            assert node.code_version and node.description and node.kinds
    for asset in PARTITIONED_ASSETS:
        pdef = graph.get(asset.key).partitions_def
        assert isinstance(pdef, dg.DynamicPartitionsDefinition) and pdef.name == "healpix"
        assert graph.get(asset.key).backfill_policy.max_partitions_per_run >= 1
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("latents")).parent_keys}
    assert parents == {"cleaned_spectra", "vae_checkpoint"}
    assert {j.name for j in repo.get_all_jobs()} >= {"ingest_partitions", "rescore_all"}
    assert {s.name for s in repo.sensor_defs} == {
        "new_data_drops",
        "backfill_stale_partitions",
        "rescore_after_new_checkpoint",
    }
    checks = {k.name for k in graph.asset_check_keys}
    assert checks >= {
        "shard_nonempty_finite",
        "drop_rate_within_bounds",
        "latents_finite",
        "scores_valid",
        "targetids_unique",
        "qvalues_monotone_in_rank",
        "reconstruction_accuracy",
        "pvalue_uniformity",
    }


def test_resources_chosen_by_environment(tmp_path):
    local = resources_from_env({})
    assert isinstance(local["ray_cluster"], LoopbackRay)
    assert Path(local["storage"].root).is_absolute() and local["storage"].duckdb_path is None
    env = {
        "DESI_ANOMALY_RAY_ADDRESS": "ray://head.example:10001",
        "DESI_ANOMALY_STORAGE_ROOT": str(tmp_path / "store"),
        "DESI_ANOMALY_DATA_ROOT": str(tmp_path / "data"),
        "DESI_ANOMALY_DUCKDB_PATH": str(tmp_path / "cat.duckdb"),
    }
    remote = resources_from_env(env)
    assert isinstance(remote["ray_cluster"], RemoteRay)
    assert remote["ray_cluster"].ray_address == "ray://head.example:10001"
    assert remote["ray_cluster"].host == "head.example"
    assert remote["storage"].root == str(tmp_path / "store")
    assert (
        remote["storage"].layout.cleaned("main-dark-1")
        == tmp_path / "store/cleaned/main-dark-1.parquet"
    )
    assert remote["data_root"].root == str(tmp_path / "data")
    assert remote["storage"].duckdb_path == str(tmp_path / "cat.duckdb")


def test_workspace_and_instance_config_load(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    workspace = (repo / "workspace.yaml").read_text()
    assert "desi_anomaly.orchestration.definitions" in workspace
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(repo / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as inst:
        assert type(inst.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(inst.run_storage).__name__ == "SqliteRunStorage"
        assert inst.get_concurrency_config().run_queue_config.max_concurrent_runs == 2
        assert not inst.telemetry_enabled
        assert (home / "history").is_dir() or (home / "storage").is_dir()


# --------------------------------------------------------------------------------------------
# Ingest: raw_spectra -> cleaned_spectra per partition


def _ingest(instance, data: Path, out: Path, key: str, **settings):
    return dg.materialize(
        [raw_spectra, cleaned_spectra],
        instance=instance,
        resources=_resources(data, out, **settings),
        partition_key=key,
        raise_on_error=False,
    )


def _materialization(instance, asset: str, key: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
    ).records
    assert records, f"no materialization of {asset} {key}"
    return records[0].asset_materialization


def test_ingest_one_partition(instance, drop, tmp_path):
    keys = _keys(drop)
    instance.add_dynamic_partitions(PARTITIONS_NAME, keys)
    result = _ingest(instance, drop, tmp_path / "out", keys[0])
    assert result.success
    raw = _materialization(instance, "raw_spectra", keys[0])
    records = raw.metadata["records"].value[keys[0]]
    coadd = discover(drop).complete[0].coadd
    assert records["coadd"]["path"] == str(coadd)
    assert records["coadd"]["size"] == coadd.stat().st_size
    assert len(records["coadd"]["sha256"]) == 64 and records["n_targets"] == 100
    assert "| main-dark" in raw.metadata["files"].value
    cleaned = _materialization(instance, "cleaned_spectra", keys[0])
    assert (tmp_path / "out" / "cleaned" / f"{keys[0]}.parquet").is_file()
    n_read, n_kept = cleaned.metadata["n_read"].value, cleaned.metadata["n_kept"].value
    assert 0 < n_kept <= n_read == 40
    assert cleaned.metadata["dagster/row_count"].value == n_kept
    assert "| reason | dropped | fraction of read |" in cleaned.metadata["drop_reasons"].value
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["shard_nonempty_finite"].passed
    assert checks["drop_rate_within_bounds"].passed
    # The data version of raw_spectra is derived from the files' checksums: same files, same one.
    again = _ingest(instance, drop, tmp_path / "out", keys[0])
    assert again.success
    v1 = raw.tags["dagster/data_version"]
    v2 = _materialization(instance, "raw_spectra", keys[0]).tags["dagster/data_version"]
    assert v1 == v2


def test_drop_rate_check_fails_beyond_its_bound(instance, drop, tmp_path):
    keys = _keys(drop)
    instance.add_dynamic_partitions(PARTITIONS_NAME, keys)
    failed = 0
    for key in keys:
        result = _ingest(instance, drop, tmp_path / "out", key, max_drop_rate_per_reason=0.0)
        assert result.success  # the check warns, the shard stays
        check = {e.check_name: e for e in result.get_asset_check_evaluations()}[
            "drop_rate_within_bounds"
        ]
        meta = _materialization(instance, "cleaned_spectra", key).metadata
        dropped = meta["n_dropped"].value
        assert check.passed == (dropped == 0)
        assert check.severity == dg.AssetCheckSeverity.WARN
        failed += not check.passed
    assert failed >= 1  # the small drop has a low-S/N spectrum


def test_corrupt_file_fails_only_its_partition(instance, drop, tmp_path):
    keys = _keys(drop)
    instance.add_dynamic_partitions(PARTITIONS_NAME, keys)
    bad = discover(drop).complete[1]
    data = bad.coadd.read_bytes()
    bad.coadd.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    outcomes = {key: _ingest(instance, drop, out, key) for key in keys}
    assert [k for k, r in outcomes.items() if not r.success] == [str(bad.key)]
    failure = next(
        e for e in outcomes[str(bad.key)].all_events if e.event_type_value == "STEP_FAILURE"
    )
    message = failure.step_failure_data.user_failure_data.description
    assert str(bad.coadd) in message and "truncated" in message
    assert not (out / "cleaned" / f"{bad.key}.parquet").exists()
    for key in keys:
        if key != str(bad.key):
            assert (out / "cleaned" / f"{key}.parquet").is_file()


def test_missing_pair_fails_with_the_reason(instance, drop, tmp_path):
    instance.add_dynamic_partitions(PARTITIONS_NAME, ["main-dark-1"])
    result = _ingest(instance, drop, tmp_path / "out", "main-dark-1")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert (
        "no complete coadd + redrock pair"
        in failure.step_failure_data.user_failure_data.description
    )


# --------------------------------------------------------------------------------------------
# Sensors


def _tick(instance, data: Path, cursor: str | None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"data_root": DataRootResource(root=str(data))}
    )
    result = sensors.new_data_drops(context)
    # What the sensor daemon does with the result: register the requested partitions.
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_sensor_registers_new_partitions_and_requests_runs(instance, drop):
    keys = _keys(drop)
    first = _tick(instance, drop, None)
    assert sorted(r.partition_key for r in first.run_requests) == keys
    assert sorted(instance.get_dynamic_partitions(PARTITIONS_NAME)) == keys
    assert first.run_requests[0].job_name in (None, "ingest_partitions")
    # Nothing new: no runs.
    second = _tick(instance, drop, first.cursor)
    assert not second.run_requests and second.skip_reason
    # A new drop arrives: only the coadd first (waits), then its redrock too.
    src = discover(drop).complete[0]
    folder = drop / "healpix" / "main" / "dark" / "12" / "1234"
    folder.mkdir(parents=True)
    shutil.copy(src.coadd, folder / "coadd-main-dark-1234.fits")
    third = _tick(instance, drop, second.cursor)
    assert not third.run_requests
    assert "main-dark-1234" not in instance.get_dynamic_partitions(PARTITIONS_NAME)
    shutil.copy(src.redrock, folder / "redrock-main-dark-1234.fits")
    fourth = _tick(instance, drop, third.cursor)
    assert [r.partition_key for r in fourth.run_requests] == ["main-dark-1234"]
    assert "main-dark-1234" in instance.get_dynamic_partitions(PARTITIONS_NAME)
    # A changed file (new size and mtime) asks for a new run with a new run key.
    with open(src.redrock, "ab") as fh:
        fh.write(b"\0" * 2880)
    os.utime(src.redrock, ns=(10**18, 10**18))
    fifth = _tick(instance, drop, fourth.cursor)
    assert [r.partition_key for r in fifth.run_requests] == [str(src.key)]
    old_key = next(r.run_key for r in first.run_requests if r.partition_key == str(src.key))
    assert fifth.run_requests[0].run_key != old_key
    assert not fifth.dynamic_partitions_requests  # already registered


def test_sensor_works_through_large_drops_in_chunks(instance, drop):
    keys = _keys(drop)
    cursor, seen = None, []
    for _ in range(len(keys)):
        requests, register, cursor, later, _ = sensors.evaluate_new_data(
            drop, cursor, set(), max_runs=1
        )
        assert len(requests) == 1 and register == [requests[0][0]]
        seen.append(requests[0][0])
        assert later == len(keys) - len(seen)
    assert seen == keys
    assert sensors.evaluate_new_data(drop, cursor, set(keys), max_runs=1)[0] == []


def test_backfill_sensor_requests_a_backfill_of_missing_partitions(instance, drop, tmp_path):
    keys = _keys(drop)
    out = tmp_path / "out"
    defs = build_definitions(_resources(drop, out))
    instance.add_dynamic_partitions(PARTITIONS_NAME, keys)
    assert _ingest(instance, drop, out, keys[0]).success
    context = dg.build_sensor_context(
        instance=instance, definitions=defs, resources={"storage": StorageResource(root=str(out))}
    )
    result = sensors.backfill_stale_partitions(context)
    (request,) = result.run_requests
    assert request.requires_backfill_daemon()
    subset = request.asset_graph_subset
    by_asset = {
        k.to_user_string(): set(s.get_partition_keys())
        for k, s in subset.partitions_subsets_by_asset_key.items()
    }
    assert by_asset == {"raw_spectra": set(keys[1:]), "cleaned_spectra": set(keys[1:])}
    # Launch it as the sensor daemon would: the backfill uses the multi-run policy.
    for key in keys[1:]:
        assert _ingest(instance, drop, out, key).success
    skipped = sensors.backfill_stale_partitions(context)
    assert isinstance(skipped, dg.SkipReason) and "up to date" in skipped.skip_message


def test_stale_partitions_after_a_new_checkpoint(tmp_path):
    from desi_anomaly.discovery import Layout

    layout = Layout(tmp_path)
    for key in ("main-dark-1", "main-dark-2"):
        layout.cleaned(key).parent.mkdir(parents=True, exist_ok=True)
        layout.cleaned(key).write_bytes(b"x")
    assert sensors.stale_partitions(["main-dark-1", "main-dark-2"], layout) == {}
    layout.model_dir.mkdir(parents=True)
    layout.checkpoint.write_bytes(b"checkpoint")
    plan = sensors.stale_partitions(["main-dark-1", "main-dark-2"], layout)
    assert plan == {"latents": ["main-dark-1", "main-dark-2"]}


# --------------------------------------------------------------------------------------------
# Catalog checks on hand-made score files: each fails on the defect it is for


def _catalog_case(tmp_path, *, duplicate=False, shuffle_q=False, skew_p=False):
    import numpy as np
    import pandas as pd

    from desi_anomaly.discovery import Layout
    from desi_anomaly.orchestration.checks import catalog_check_results

    rng = np.random.default_rng(0)
    layout = Layout(tmp_path)
    n = 400
    split = np.array(["train", "calibration", "test", "test"] * (n // 4))
    p = rng.uniform(size=n) ** (4.0 if skew_p else 1.0)
    scores = pd.DataFrame(
        {
            "TARGETID": np.arange(n, dtype=np.int64),
            "PARTITION": "main-dark-1",
            "SPLIT": split,
            "RECON_RCHI2": rng.uniform(0.8, 1.2, n),
            "P_VALUE": p,
        }
    )
    layout.scores("main-dark-1").parent.mkdir(parents=True)
    scores.to_parquet(layout.scores("main-dark-1"))
    catalog = pd.DataFrame(
        {
            "RANK": np.arange(1, 11),
            "TARGETID": np.arange(10, dtype=np.int64),
            "Q_VALUE": np.linspace(0.0001, 0.009, 10),
        }
    )
    if duplicate:
        catalog.loc[3, "TARGETID"] = 2
    if shuffle_q:
        catalog.loc[5, "Q_VALUE"] = 0.00001
    results = catalog_check_results(layout, ["main-dark-1"], catalog, {}, PipelineSettings())
    return {r.check_name: r.passed for r in results}


def test_catalog_checks_fail_on_their_defects(tmp_path):
    good = _catalog_case(tmp_path / "good")
    assert all(good.values()), good
    assert not _catalog_case(tmp_path / "dup", duplicate=True)["targetids_unique"]
    assert not _catalog_case(tmp_path / "q", shuffle_q=True)["qvalues_monotone_in_rank"]
    assert not _catalog_case(tmp_path / "p", skew_p=True)["pvalue_uniformity"]
