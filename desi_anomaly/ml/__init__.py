"""Spectral VAE: model, training, encoding and their Ray dispatch. Plain torch/Ray, no Dagster.

from desi_anomaly.ml import VAEConfig, train_vae, load_checkpoint, encode_shard
ckpt = train_vae(shard_paths, "out/vae", VAEConfig(), max_spectra=200_000)
table = encode_shard(load_checkpoint(ckpt), read_shard(path))
"""

from .encoding import (
    EncodeResult,
    Reconstructions,
    already_encoded,
    encode_partition,
    encode_shard,
    latents_path,
    read_latents_info,
    reconstruct,
    write_latents,
)
from .training import (
    CheckpointError,
    TrainedVAE,
    TrainingDataError,
    file_sha256,
    load_checkpoint,
    train_vae,
)
from .vae import EMISSION_LINES, SpectrumVAE, VAEConfig

__all__ = [
    "EMISSION_LINES",
    "CheckpointError",
    "EncodeResult",
    "Reconstructions",
    "SpectrumVAE",
    "TrainedVAE",
    "TrainingDataError",
    "VAEConfig",
    "already_encoded",
    "encode_partition",
    "encode_shard",
    "file_sha256",
    "latents_path",
    "load_checkpoint",
    "read_latents_info",
    "reconstruct",
    "train_vae",
    "write_latents",
]
