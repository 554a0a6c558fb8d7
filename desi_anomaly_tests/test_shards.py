import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from desi_anomaly.shards import ShardError, read_shard, read_shard_info, write_shard


def _arrays(n=20, npix=64, seed=0):
    rng = np.random.default_rng(seed)
    flux = rng.normal(size=(n, npix)).astype(np.float32)
    ivar = rng.random((n, npix)).astype(np.float32)
    coverage = rng.random((n, npix)) > 0.2
    meta = pd.DataFrame({"TARGETID": np.arange(n, dtype=np.int64) + 10**15, "Z": rng.random(n)})
    return flux, ivar, coverage, meta


def test_round_trip_zero_copy(tmp_path):
    flux, ivar, coverage, meta = _arrays()
    info = {"partition": "main-dark-1", "grid": {"npix": 64}, "drop_counts": {"low_snr": 2}}
    path = write_shard(
        tmp_path / "s.parquet", flux=flux, ivar=ivar, coverage=coverage, meta=meta, info=info
    )
    shard = read_shard(path)
    assert np.array_equal(shard.flux, flux) and shard.flux.dtype == np.float32
    assert np.array_equal(shard.ivar, ivar)
    assert np.array_equal(shard.coverage, coverage) and shard.coverage.dtype == bool
    pd.testing.assert_frame_equal(shard.meta, meta)
    # Zero-copy: the arrays are views on Arrow buffers, not numpy-owned copies.
    for arr in (shard.flux, shard.ivar, shard.coverage):
        assert not arr.flags.owndata
    assert shard.info["partition"] == "main-dark-1"
    assert shard.info["schema_version"] == 1 and shard.info["code_version"]
    assert read_shard_info(path)["drop_counts"] == {"low_snr": 2}
    # Fixed-size float32 list columns in the Parquet schema.
    schema = pq.read_schema(path)
    assert schema.field("FLUX").type == pa.list_(pa.float32(), 64)
    assert schema.field("COVERAGE").type == pa.list_(pa.uint8(), 64)


def test_empty_shard_keeps_its_grid_width(tmp_path):
    flux, ivar, coverage, meta = _arrays(n=0)
    path = write_shard(
        tmp_path / "e.parquet", flux=flux, ivar=ivar, coverage=coverage, meta=meta, info={}
    )
    shard = read_shard(path)
    assert len(shard) == 0 and shard.flux.shape == (0, 64)
    assert list(shard.meta.columns) == ["TARGETID", "Z"]


def test_shape_mismatch_is_refused_and_nothing_written(tmp_path):
    flux, ivar, coverage, meta = _arrays()
    with pytest.raises(ValueError, match="ivar has shape"):
        write_shard(
            tmp_path / "x.parquet",
            flux=flux,
            ivar=ivar[:, :10],
            coverage=coverage,
            meta=meta,
            info={},
        )
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_previous_shard(tmp_path, monkeypatch):
    flux, ivar, coverage, meta = _arrays()
    path = tmp_path / "s.parquet"
    write_shard(path, flux=flux, ivar=ivar, coverage=coverage, meta=meta, info={"v": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(path, flux=flux * 2, ivar=ivar, coverage=coverage, meta=meta, info={"v": 2})
    assert read_shard_info(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temporary file left


def test_foreign_or_old_files_are_refused(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(ShardError, match="not a desi-anomaly shard"):
        read_shard(plain)
    old = tmp_path / "old.parquet"
    meta = {b"desi_anomaly": json.dumps({"schema_version": 0}).encode()}
    pq.write_table(pa.table({"a": [1]}).replace_schema_metadata(meta), old)
    with pytest.raises(ShardError, match="schema version 0"):
        read_shard(old)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(ShardError, match=r"junk\.parquet"):
        read_shard(junk)
