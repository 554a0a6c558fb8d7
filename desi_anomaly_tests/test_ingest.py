"""Ingest: one shard per partition, bad partitions isolated, reruns identical."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

from desi_anomaly.cli import main
from desi_anomaly.ingest import clean_partitions, shard_path
from desi_anomaly.io.partitions import discover
from desi_anomaly.shards import read_shard
from desi_anomaly_tests.fitsedit import rewrite_fits


def test_bad_file_fails_only_its_partition(small_drop, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_drop, root)
    found = discover(root).complete
    bad = found[1]
    data = bad.coadd.read_bytes()
    bad.coadd.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    results = clean_partitions(found, out)
    by_key = {r.key: r for r in results}
    assert not by_key[str(bad.key)].ok
    assert str(bad.coadd) in by_key[str(bad.key)].error
    assert not shard_path(out, str(bad.key)).exists()
    for files in (found[0], found[2]):
        result = by_key[str(files.key)]
        assert result.ok and result.n_kept > 0
        shard = read_shard(result.shard)
        assert len(shard) == result.n_kept
        assert shard.info["partition"] == str(files.key)
        assert shard.info["sources"]["coadd"]["path"] == str(files.coadd)
        assert (shard.meta["PARTITION"] == str(files.key)).all()
        # Every spectrum read is either in the shard or listed as dropped with a reason.
        assert result.n_read == len(shard) + len(shard.info["dropped"]["TARGETID"])
        assert sum(shard.info["drop_counts"].values()) == len(shard.info["dropped"]["TARGETID"])


def test_rerun_is_identical(small_drop, tmp_path):
    files = discover(small_drop).complete[:1]
    first = read_shard(clean_partitions(files, tmp_path / "a")[0].shard)
    second = read_shard(clean_partitions(files, tmp_path / "b")[0].shard)
    assert np.array_equal(first.flux, second.flux) and np.array_equal(first.ivar, second.ivar)
    pd.testing.assert_frame_equal(first.meta, second.meta)
    assert first.info["grid"] == second.info["grid"]


def test_partition_without_qsos_gives_empty_shard(small_drop, tmp_path):
    files = discover(small_drop).complete[0]
    redrock = tmp_path / files.redrock.name

    def no_qsos(table):
        table = table.copy()
        table["SPECTYPE"] = "STAR"
        return table

    rewrite_fits(files.redrock, redrock, {"REDSHIFTS": no_qsos})
    empty = type(files)(files.key, files.coadd, redrock)
    [result] = clean_partitions([empty], tmp_path / "out")
    assert result.ok and result.n_read == 0
    shard = read_shard(result.shard)
    assert len(shard) == 0 and shard.flux.shape[1] == shard.info["grid"]["npix"]


def test_cli_ingest_reports_failures_and_continues(small_drop, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(small_drop, root)
    bad = discover(root).complete[0]
    bad.redrock.write_bytes(b"garbage")
    status = main(["ingest", str(root), "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert status == 1
    assert f"FAILED {bad.key}" in out.out and str(bad.redrock) in out.out
    assert "partitions: 2 cleaned, 1 failed" in out.out
    assert len(list((tmp_path / "out" / "cleaned").glob("*.parquet"))) == 2
