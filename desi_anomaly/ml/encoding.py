"""Encoding of cleaned shards with a trained VAE: latents and reconstruction chi2 per spectrum.

Latents file (``{out_dir}/latents/{key}.parquet``, one per partition, written atomically): columns
TARGETID (int64), PARTITION (string), LATENT (fixed-size list of ``VAEConfig.code_dim`` float32:
the latent posterior mean followed by the eigenspectrum coefficients), RECON_CHI2 (float64, chi2 of
the reconstruction from the posterior mean and the solved coefficients over the pixels with data,
with the effective ivar of ``SpectrumVAE.effective_ivar``), N_GOOD (int32, pixels with finite flux
and ivar > 0), RECON_RCHI2 (float64, RECON_CHI2 / N_GOOD, NaN when N_GOOD is 0), RESID_DIP,
RESID_PEAK and FOREST_DIP (float64, the strongest absorption redward of Lyman-alpha, emission
feature anywhere and absorption in the forest's damped Lyman-alpha search window missed by the
reconstruction, ``desi_anomaly.ml.residuals``; 0 where a region has no data), VAE_TRAINED (bool:
the VAE trained on this spectrum, which it therefore fits better than new ones). Key-value metadata
``desi_anomaly`` (JSON): schema name and version, code version, partition, checkpoint path and
sha256, grid, latent_dim (the code length).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from desi_anomaly import __version__
from desi_anomaly.atomic import atomic_path
from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.io.partitions import parse_key
from desi_anomaly.preprocess import RestFrameGrid
from desi_anomaly.shards import Shard, read_shard, read_shard_info

from .residuals import (
    PEAK_WINDOW_KMS,
    TROUGH_WINDOW_KMS,
    dla_search_pixels,
    strongest_dip,
    strongest_peak,
    window_widths,
)
from .training import CheckpointError, TrainedVAE, same_grid
from .vae import chi2, clean_inputs

LATENTS_SCHEMA_VERSION = 5
ENCODE_BATCH = 128  # spectra per forward pass: the linear solve holds batch x npix x linear_dim
_META_KEY = b"desi_anomaly"


@dataclass
class Reconstructions:
    """Inputs and reconstructions of selected spectra, for explanations and plots."""

    targetid: np.ndarray  # (n,) int64
    wave: np.ndarray  # (npix,) rest-frame pixel centres, Angstrom
    flux: np.ndarray  # (n, npix) float32, 0 where there is no data
    ivar: np.ndarray  # (n, npix) float32 effective ivar (extra variance included), 0: no data
    model: np.ndarray  # (n, npix) float32 reconstruction (from the posterior mean) on the grid

    @property
    def residual(self) -> np.ndarray:
        """(flux - model) * sqrt(ivar): normalised residuals, 0 where there is no data."""
        return (self.flux - self.model) * np.sqrt(self.ivar)


@dataclass
class EncodeResult:
    """Outcome of encoding one partition."""

    key: str
    latents: Path | None = None
    n_spectra: int = 0
    skipped: bool = False
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def latents_path(out_dir: str | Path, key: str) -> Path:
    """Where the latents of partition ``key`` live under ``out_dir`` (the key is validated)."""
    return Path(out_dir) / "latents" / f"{parse_key(key)}.parquet"


def _check_shard(vae: TrainedVAE, shard: Shard) -> None:
    where = shard.info.get("partition", "shard")
    if not same_grid(shard.info["grid"], vae.grid):
        raise CheckpointError(
            f"{vae.path}: trained on rest-frame grid {vae.grid}, but shard {where} is on "
            f"{shard.info['grid']}; retrain or preprocess onto the checkpoint's grid"
        )
    if shard.flux.shape[1] != vae.config.npix:
        raise CheckpointError(
            f"{vae.path}: expects {vae.config.npix} pixels, shard {where} has {shard.flux.shape[1]}"
        )


def _redshift(shard: Shard) -> np.ndarray:
    """(n,) float64 Z of the shard's spectra (the extra variance depends on it)."""
    where = shard.info.get("partition", "shard")
    if len(shard.flux) == 0:
        return np.empty(0)
    if "Z" not in shard.meta:
        raise DesiAnomalyError(f"shard {where} has no Z column: cannot encode its spectra")
    z = shard.meta["Z"].to_numpy(dtype=np.float64)
    if not np.isfinite(z).all():
        raise DesiAnomalyError(f"shard {where}: {int((~np.isfinite(z)).sum())} spectra lack a Z")
    return z


@dataclass
class _Batch:
    code: np.ndarray  # (n, code_dim) posterior mean and eigenspectrum coefficients
    model: np.ndarray  # (n, npix) reconstruction
    chi2: np.ndarray  # (n,) with the effective ivar
    n_good: np.ndarray  # (n,) pixels with data
    ivar: np.ndarray  # (n, npix) effective ivar (extra variance included)
    dip: np.ndarray  # (n,) RESID_DIP
    peak: np.ndarray  # (n,) RESID_PEAK
    forest_dip: np.ndarray  # (n,) FOREST_DIP


def _region(pixels: np.ndarray, pad: int) -> tuple[slice, np.ndarray]:
    """Columns a residual scan of the region ``pixels`` (npix,) reads: its span widened by ``pad``
    (windows reaching past its edge count its pixels only), and the region's mask on them."""
    idx = np.flatnonzero(pixels)
    if not idx.size:
        return slice(0, 0), pixels[:0]
    cols = slice(max(int(idx[0]) - pad, 0), int(idx[-1]) + 1 + pad)
    return cols, pixels[cols]


def _scan(statistic, pull: np.ndarray, good: np.ndarray, region, widths) -> np.ndarray:
    """``statistic`` (``strongest_dip`` or ``strongest_peak``) over one ``_region``."""
    cols, inside = region
    return statistic(pull[:, cols], good[:, cols] & inside, widths)


def _batched_forward(
    vae: TrainedVAE, flux: np.ndarray, ivar: np.ndarray, redshift: np.ndarray, batch_size: int
) -> Iterator[_Batch]:
    """Encode and reconstruct ``batch_size`` spectra at a time."""
    device = next(vae.model.parameters()).device
    grid = RestFrameGrid.from_dict(vae.grid)
    troughs = window_widths(grid.velocity_per_pixel, TROUGH_WINDOW_KMS)
    peaks = window_widths(grid.velocity_per_pixel, PEAK_WINDOW_KMS)
    forest = vae.model.forest_pixels(grid.centres)
    pad = max(troughs + peaks) - 1
    red, lya_forest, dla_window = (
        _region(m, pad) for m in (~forest, forest, dla_search_pixels(grid.centres))
    )
    for start in range(0, len(flux), batch_size):
        f, iv = clean_inputs(flux[start : start + batch_size], ivar[start : start + batch_size])
        f_t, iv_t = torch.from_numpy(f).to(device), torch.from_numpy(iv).to(device)
        z_t = torch.tensor(redshift[start : start + batch_size], device=device)
        recon, mu, coef = vae.model.fit_spectra(f_t, iv_t, z_t)
        f_d = f_t.double()
        iv_eff = vae.model.effective_ivar(iv_t.double(), recon, z_t)
        pull = ((f_d - recon) * iv_eff.sqrt()).cpu().numpy()
        good = iv > 0
        peak = np.maximum(
            _scan(strongest_peak, pull, good, red, peaks),
            _scan(strongest_peak, pull, good, lya_forest, peaks),
        )
        yield _Batch(
            torch.cat([mu.double(), coef], dim=1).float().cpu().numpy(),
            recon.float().cpu().numpy(),
            chi2(f_d, iv_eff, recon).cpu().numpy(),
            good.sum(axis=1).astype(np.int32),
            iv_eff.float().cpu().numpy(),
            _scan(strongest_dip, pull, good, red, troughs),
            peak,
            _scan(strongest_dip, pull, good, dla_window, troughs),
        )


def encode_shard(vae: TrainedVAE, shard: Shard, *, batch_size: int = ENCODE_BATCH) -> pa.Table:
    """Latents and reconstruction chi2 of every spectrum of ``shard`` (schema in the module doc).

    Non-finite flux or ivar pixels count as missing data. Raises CheckpointError when the shard's
    grid differs from the checkpoint's.
    """
    _check_shard(vae, shard)
    n, dim = len(shard), vae.config.code_dim
    latent = np.empty((n, dim), dtype=np.float32)
    recon_chi2, dip, peak, forest_dip = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    n_good = np.empty(n, dtype=np.int32)
    start = 0
    for b in _batched_forward(vae, shard.flux, shard.ivar, _redshift(shard), batch_size):
        sel = slice(start, start + len(b.code))
        latent[sel], recon_chi2[sel], n_good[sel] = b.code, b.chi2, b.n_good
        dip[sel], peak[sel], forest_dip[sel] = b.dip, b.peak, b.forest_dip
        start += len(b.code)
    with np.errstate(invalid="ignore", divide="ignore"):
        rchi2 = np.where(n_good > 0, recon_chi2 / n_good, np.nan)
    partition = shard.meta["PARTITION"] if "PARTITION" in shard.meta else shard.info["partition"]
    tid = shard.meta["TARGETID"].to_numpy(dtype=np.int64)
    columns = {
        "TARGETID": pa.array(tid),
        "PARTITION": pa.array(np.broadcast_to(np.asarray(partition, dtype=object), n), pa.string()),
        "LATENT": pa.FixedSizeListArray.from_arrays(pa.array(latent.ravel()), dim),
        "RECON_CHI2": pa.array(recon_chi2),
        "RECON_RCHI2": pa.array(rchi2),
        "RESID_DIP": pa.array(np.where(n_good > 0, dip, np.nan)),
        "RESID_PEAK": pa.array(np.where(n_good > 0, peak, np.nan)),
        "FOREST_DIP": pa.array(np.where(n_good > 0, forest_dip, np.nan)),
        "N_GOOD": pa.array(n_good),
        "VAE_TRAINED": pa.array(np.isin(tid, vae.trained_targetids)),
    }
    return pa.table(columns)


def reconstruct(
    vae: TrainedVAE, shard: Shard, targetids: Any = None, *, batch_size: int = ENCODE_BATCH
) -> Reconstructions:
    """Reconstructions of the spectra of ``shard`` with the given TARGETIDs (all when None)."""
    _check_shard(vae, shard)
    tid = shard.meta["TARGETID"].to_numpy(dtype=np.int64)
    rows = np.arange(len(tid)) if targetids is None else np.flatnonzero(np.isin(tid, targetids))
    flux, ivar = clean_inputs(shard.flux[rows], shard.ivar[rows])
    redshift = _redshift(shard)[rows]
    parts = [(b.model, b.ivar) for b in _batched_forward(vae, flux, ivar, redshift, batch_size)]
    empty = np.zeros((0, vae.config.npix), np.float32)
    model = np.concatenate([r for r, _ in parts]) if parts else empty
    ivar_eff = np.concatenate([iv for _, iv in parts]) if parts else empty
    wave = RestFrameGrid.from_dict(vae.grid).centres
    return Reconstructions(tid[rows], wave, flux, ivar_eff, model)


def write_latents(table: pa.Table, path: str | Path, vae: TrainedVAE, partition: str) -> Path:
    """Write a latents table atomically with its provenance metadata."""
    meta = {
        "schema": "latents",
        "schema_version": LATENTS_SCHEMA_VERSION,
        "code_version": __version__,
        "partition": partition,
        "checkpoint": str(vae.path),
        "checkpoint_sha256": vae.sha256,
        "grid": vae.grid,
        "latent_dim": vae.config.code_dim,
    }
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_latents_info(path: str | Path) -> dict[str, Any] | None:
    """Provenance metadata of a latents file; None when the file is absent or unreadable."""
    try:
        raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    except (OSError, pa.ArrowInvalid):
        return None
    return None if raw is None else json.loads(raw)


def already_encoded(
    shard_path: str | Path, out_dir: str | Path, checkpoint_sha256: str
) -> EncodeResult | None:
    """A ``skipped`` result when the shard's latents file exists from the same checkpoint, else
    None (also when the shard is unreadable: encoding it then reports the error)."""
    try:
        key = str(read_shard_info(shard_path)["partition"])
        target = latents_path(out_dir, key)
    except DesiAnomalyError:
        return None
    info = read_latents_info(target)
    if info is None or info.get("checkpoint_sha256") != checkpoint_sha256:
        return None
    return EncodeResult(key, target, pq.read_metadata(target).num_rows, skipped=True)


def encode_partition(
    vae: TrainedVAE, shard_path: str | Path, out_dir: str | Path, *, batch_size: int = ENCODE_BATCH
) -> EncodeResult:
    """Encode one shard into ``latents/{key}.parquet`` unless a file from the same checkpoint
    exists (then ``skipped``). Errors of the input are returned in the result, not raised."""
    start = time.perf_counter()
    key = Path(shard_path).stem
    try:
        done = already_encoded(shard_path, out_dir, vae.sha256)
        if done is not None:
            return done
        key = str(read_shard_info(shard_path)["partition"])
        target = latents_path(out_dir, key)
        table = encode_shard(vae, read_shard(shard_path), batch_size=batch_size)
        write_latents(table, target, vae, key)
    except DesiAnomalyError as exc:
        return EncodeResult(key, error=str(exc), seconds=time.perf_counter() - start)
    return EncodeResult(key, target, table.num_rows, seconds=time.perf_counter() - start)
