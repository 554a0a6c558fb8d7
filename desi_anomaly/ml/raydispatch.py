"""Dispatch of VAE training and encoding to Ray (a local runtime or an existing cluster).

Paths handed to Ray tasks must be visible to the workers (local disk for a local runtime, a shared
volume or mount on a cluster).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray._private import ray_constants

from .encoding import ENCODE_BATCH, EncodeResult, already_encoded, encode_partition
from .training import file_sha256, load_checkpoint, train_vae
from .vae import VAEConfig


def init_ray(address: str | None = None, *, num_cpus: int = 2) -> None:
    """Connect to the Ray cluster at ``address``, or start a quiet local runtime on 127.0.0.1
    with ``num_cpus`` CPUs and no dashboard when ``address`` is None. No-op if already connected."""
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        # Ray resolves 127.0.0.1 to the routable address unless cluster mode is off; turning it
        # off (for this process and the Ray processes it starts) binds everything to loopback.
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (0 when it has none)."""
    return ray.cluster_resources().get("GPU", 0)


def largest_node_cpus() -> int:
    """CPUs of the connected cluster's largest alive node."""
    return max(
        (int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1
    )


def _train_task(shards, out_dir, config_dict, num_cpus, options) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(num_cpus)
    path = train_vae(shards, out_dir, VAEConfig.from_dict(config_dict), device=device, **options)
    return str(path)


def train_on_ray(
    shards: Sequence[str | Path],
    out_dir: str | Path,
    config: VAEConfig | None = None,
    *,
    num_cpus: int | None = None,
    **options: Any,
) -> Path:
    """Run ``train_vae`` as one Ray task: one GPU (and one CPU) when the cluster has any GPU,
    else every CPU of its largest node as torch threads, unless ``num_cpus`` is given. The device
    is chosen inside the task, ``options`` (resume, max_spectra, split) go to ``train_vae``.
    Returns the checkpoint path."""
    config = config or VAEConfig()
    gpu = cluster_gpus() > 0
    num_cpus = num_cpus or (1 if gpu else largest_node_cpus())
    task = ray.remote(_train_task).options(
        num_cpus=num_cpus, num_gpus=1 if gpu else 0, max_retries=0
    )
    ref = task.remote([str(p) for p in shards], str(out_dir), config.to_dict(), num_cpus, options)
    return Path(ray.get(ref))


@ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)
class ShardEncoder:
    """A Ray actor holding one loaded checkpoint; encodes shards one after another.

    When its process or node dies, Ray restarts it (on any node with a free CPU) and re-runs the
    calls that had not returned; encoding is idempotent (a partition already written with the same
    checkpoint is skipped, files are renamed into place whole), so nothing is written twice.
    Errors raised by the encoding itself are not retried.
    """

    def __init__(self, checkpoint: str, threads: int):
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_checkpoint(checkpoint, device=device)

    def encode(self, shard_path: str, out_dir: str, batch_size: int) -> EncodeResult:
        return encode_partition(self.vae, shard_path, out_dir, batch_size=batch_size)


def encode_shards_on_ray(
    checkpoint: str | Path,
    shard_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = ENCODE_BATCH,
    num_actors: int = 2,
) -> list[EncodeResult]:
    """Encode shards into ``{out_dir}/latents/{key}.parquet`` with a pool of ``num_actors`` actors
    (each loads the checkpoint once, on a share of the cluster's GPUs when it has any).
    Partitions already encoded with this checkpoint are skipped without starting any actor; a
    failing shard yields an error result for its partition only. Results follow ``shard_paths``.
    """
    sha256 = file_sha256(checkpoint)
    results = [already_encoded(p, out_dir, sha256) for p in shard_paths]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results
    n_actors = max(1, min(num_actors, len(todo)))
    gpus = cluster_gpus()  # actors share the GPUs when there are any
    share = min(1.0, gpus / n_actors) if gpus else 0
    actors = [
        ShardEncoder.options(num_gpus=share).remote(str(checkpoint), 1) for _ in range(n_actors)
    ]
    refs = {
        i: actors[j % n_actors].encode.remote(str(shard_paths[i]), str(out_dir), batch_size)
        for j, i in enumerate(todo)
    }
    for i, ref in refs.items():
        try:
            results[i] = ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
            results[i] = EncodeResult(Path(shard_paths[i]).stem, error=_readable(exc))
    for actor in actors:
        ray.kill(actor)
    return results


def _readable(exc: Exception) -> str:
    """The underlying error of a Ray failure, without Ray's traceback wrapping."""
    cause = getattr(exc, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc).splitlines()[-1]
