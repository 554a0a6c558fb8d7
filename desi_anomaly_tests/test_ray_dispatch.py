"""Ray dispatch of VAE training and encoding on a real local Ray runtime (2 CPUs).

Data: the small mock drop, ingested into cleaned shards on the default 4000-pixel grid; the model
is tiny so that training and encoding take seconds.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from desi_anomaly.ingest import clean_partitions
from desi_anomaly.io.partitions import discover
from desi_anomaly.ml import (
    VAEConfig,
    encode_shard,
    file_sha256,
    load_checkpoint,
    read_latents_info,
    train_vae,
)
from desi_anomaly.ml.raydispatch import (
    encode_shards_on_ray,
    init_ray,
    largest_node_cpus,
    train_on_ray,
)
from desi_anomaly.shards import read_shard

TINY = VAEConfig(latent_dim=4, channels=(4, 8, 8, 8, 8, 8), epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def local_ray():
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(small_drop, tmp_path_factory):
    out = tmp_path_factory.mktemp("cleaned")
    results = clean_partitions(discover(small_drop).complete, out)
    assert all(r.ok for r in results)
    return sorted(r.shard for r in results)


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray worker
    yield train_vae(shards, tmp_path_factory.mktemp("vae"), TINY)
    torch.set_num_threads(threads)


def test_local_runtime_is_bound_to_localhost_with_the_requested_cpus(local_ray):
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray.cluster_resources()["CPU"] == 2
    init_ray(None)  # already connected: a no-op, not a second runtime
    assert ray.cluster_resources()["CPU"] == 2
    assert largest_node_cpus() == 2  # CPU-only training takes the whole node as torch threads


def test_train_on_ray_reaches_the_in_process_result(local_ray, shards, checkpoint, tmp_path):
    # one CPU, as the in-process run: bit-identical weights need the same torch thread count
    remote = load_checkpoint(train_on_ray(shards, tmp_path, TINY, num_cpus=1))
    local = load_checkpoint(checkpoint)
    assert [h["val_loss"] for h in remote.history] == [h["val_loss"] for h in local.history]
    for name, weights in local.model.state_dict().items():
        assert torch.equal(weights, remote.model.state_dict()[name]), name


@pytest.fixture(scope="module")
def encoded(local_ray, shards, checkpoint, tmp_path_factory):
    """One Ray encoding run over the shards plus a broken file (its partition must fail alone)."""
    out = tmp_path_factory.mktemp("encoded")
    broken = out / "main-dark-77.parquet"
    broken.write_bytes(b"not parquet at all")
    results = encode_shards_on_ray(checkpoint, [*shards, broken], out, batch_size=16, num_actors=2)
    return out, results


def test_encode_on_ray_equals_in_process_encoding(shards, checkpoint, encoded):
    _, results = encoded
    vae = load_checkpoint(checkpoint)
    for path, result in zip(shards, results, strict=False):
        shard = read_shard(path)
        assert result.ok and result.key == shard.info["partition"]
        assert result.n_spectra == len(shard)
        expected = encode_shard(vae, shard).to_pandas()
        got = pq.read_table(result.latents).to_pandas()
        np.testing.assert_array_equal(got["TARGETID"], expected["TARGETID"])
        np.testing.assert_array_equal(got["N_GOOD"], expected["N_GOOD"])
        np.testing.assert_allclose(
            np.stack(got["LATENT"]), np.stack(expected["LATENT"]), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(got["RECON_CHI2"], expected["RECON_CHI2"], rtol=1e-5)
        assert read_latents_info(result.latents)["checkpoint_sha256"] == file_sha256(checkpoint)


def test_a_failing_shard_fails_only_its_partition(shards, encoded):
    out, results = encoded
    assert [r.ok for r in results] == [True] * len(shards) + [False]
    failed = results[-1]
    assert failed.key == "main-dark-77"
    assert "main-dark-77.parquet" in failed.error and "Parquet" in failed.error
    assert not (out / "latents" / "main-dark-77.parquet").exists()


def test_encoding_again_skips_partitions_done_with_the_same_checkpoint(shards, checkpoint, encoded):
    out, first = encoded
    stamps = [r.latents.stat().st_mtime_ns for r in first if r.ok]
    again = encode_shards_on_ray(checkpoint, shards, out, num_actors=1)
    assert all(r.skipped and r.ok for r in again)
    assert [r.n_spectra for r in again] == [r.n_spectra for r in first if r.ok]
    assert [r.latents.stat().st_mtime_ns for r in again] == stamps
