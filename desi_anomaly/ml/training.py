"""Training of the spectral VAE from cleaned shards: sampling, early stopping, checkpoints.

The checkpoint (``{out_dir}/vae_checkpoint.pt``, rewritten atomically after every epoch) holds
everything needed to resume bit-for-bit on CPU and to encode later: current and best weights,
optimizer state, config, rest-frame grid, training history, early-stopping state, RNG states, a
fingerprint of the training shards and the TARGETIDs of the spectra it trained on (so that
scoring can tell them from spectra it never saw). When training finishes, the best model's
per-pixel extra variance is measured in quasar-redshift bins on (up to ``NOISE_ROWS`` of) the
validation spectra, which it did not train on (``desi_anomaly.ml.noise``), and stored with its
weights.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from desi_anomaly import __version__
from desi_anomaly.atomic import atomic_path
from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.preprocess import RestFrameGrid
from desi_anomaly.shards import read_shard, read_shard_info
from desi_anomaly.splits import assign_split

from .noise import excess_variance_by_redshift
from .vae import (
    EXTRA_VAR_ROWS,
    SpectrumVAE,
    VAEConfig,
    clean_inputs,
    line_pixel_weight,
    vae_loss,
)

CHECKPOINT_NAME = "vae_checkpoint.pt"
CHECKPOINT_FORMAT = "desi-anomaly-vae"
CHECKPOINT_VERSION = 7
PCA_INIT_ROWS = 4000  # training spectra whose principal components start the eigenspectra
NOISE_ROWS = 4000  # validation spectra on which the extra variance is measured
NOISE_SMOOTH_KMS = 5_000.0  # pixels pooled by the extra-variance estimate


class CheckpointError(DesiAnomalyError):
    """A checkpoint that cannot be used: names the file and the problem."""


class CheckpointMismatchError(CheckpointError):
    """A saved checkpoint that cannot be resumed: other config, grid or training shards."""


class TrainingDataError(DesiAnomalyError):
    """Training shards that cannot be used together (different grids, too few spectra)."""


@dataclass
class TrainedVAE:
    """A loaded checkpoint: the best model (eval mode) and what it was trained on."""

    model: SpectrumVAE
    config: VAEConfig
    grid: dict[str, Any]
    path: Path
    sha256: str
    history: list[dict[str, float]]
    trained_targetids: np.ndarray  # sorted TARGETIDs of the spectra it trained on (not validation)


class TrainingSample(NamedTuple):
    """Spectra drawn for training by ``sample_spectra``."""

    flux: np.ndarray  # (n, npix) float32, cleaned by ``clean_inputs``
    ivar: np.ndarray  # (n, npix) float32
    redshift: np.ndarray  # (n,) float64
    targetid: np.ndarray  # (n,) int64
    grid: dict[str, Any]


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file (the checkpoint hash recorded with every latents file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_grid(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two grid dicts describe the same rest-frame grid."""
    return RestFrameGrid.from_dict(a) == RestFrameGrid.from_dict(b)


def sample_spectra(
    shards: Sequence[Path],
    max_spectra: int | None,
    rng: np.random.Generator,
    split: str | None = None,
) -> TrainingSample:
    """Up to ``max_spectra`` spectra drawn uniformly without replacement across ``shards`` (only
    those of ``split`` when given, see ``desi_anomaly.splits``); only the drawn rows are kept in
    memory."""
    if not shards:
        raise TrainingDataError("no training shards given")
    grid = read_shard_info(shards[0])["grid"]
    for path in shards[1:]:
        if not same_grid(read_shard_info(path)["grid"], grid):
            raise TrainingDataError(f"{path}: rest-frame grid differs from that of {shards[0]}")
    eligible = [_eligible_rows(p, split) for p in shards]
    counts = np.array([len(rows) for rows in eligible])
    total = int(counts.sum())
    n = total if max_spectra is None else min(int(max_spectra), total)
    chosen = np.sort(rng.choice(total, n, replace=False))
    starts = np.concatenate(([0], np.cumsum(counts)))
    npix = int(grid["npix"])
    flux = np.empty((n, npix), dtype=np.float32)
    ivar = np.empty((n, npix), dtype=np.float32)
    redshift = np.empty(n, dtype=np.float64)
    targetid = np.empty(n, dtype=np.int64)
    filled = 0
    for i, path in enumerate(shards):
        picked = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(picked) == 0:
            continue
        rows = eligible[i][picked]
        shard = read_shard(path, meta_columns=["TARGETID", "Z"])
        if "Z" not in shard.meta:
            raise TrainingDataError(f"{path}: shard has no Z column")
        sel = slice(filled, filled + len(rows))
        flux[sel], ivar[sel] = clean_inputs(shard.flux[rows], shard.ivar[rows])
        redshift[sel] = shard.meta["Z"].to_numpy(dtype=np.float64)[rows]
        targetid[sel] = shard.meta["TARGETID"].to_numpy(dtype=np.int64)[rows]
        filled += len(rows)
    return TrainingSample(flux, ivar, redshift, targetid, grid)


def _eligible_rows(path: Path, split: str | None) -> np.ndarray:
    """Row numbers of ``path`` belonging to ``split`` (all rows when None)."""
    if split is None:
        return np.arange(pq.read_metadata(path).num_rows)
    targetid = pq.read_table(path, columns=["TARGETID"])["TARGETID"].to_numpy()
    return np.flatnonzero(assign_split(targetid) == split)


def train_vae(
    shards: Sequence[str | Path],
    out_dir: str | Path,
    config: VAEConfig | None = None,
    *,
    resume: bool = True,
    progress: Callable[[dict[str, float]], None] | None = None,
    max_spectra: int | None = None,
    split: str | None = None,
    device: str = "cpu",
) -> Path:
    """Train the VAE on (a uniform sample of at most ``max_spectra``) spectra of ``shards``, only
    those of ``split`` (``desi_anomaly.splits``) when given.

    ``max_spectra=None`` uses every spectrum (about 32 kB each at 4000 pixels): cap it for a full
    release. A checkpoint is written after every epoch; with ``resume`` an existing checkpoint of
    the same config and shards is continued (a finished one is returned as is), and the result
    equals that of an uninterrupted run. ``progress`` gets each epoch's record (epoch, train_loss,
    val_loss, seconds) after its checkpoint is written. Returns the checkpoint path.
    """
    config = config or VAEConfig()
    shards = [Path(p) for p in shards]
    path = Path(out_dir) / CHECKPOINT_NAME
    rng = np.random.default_rng(config.seed)
    flux, ivar, redshift, targetid, grid = sample_spectra(shards, max_spectra, rng, split)
    if int(grid["npix"]) != config.npix:
        raise TrainingDataError(f"shards have {grid['npix']} pixels, config.npix is {config.npix}")
    if len(flux) < 2:
        raise TrainingDataError(f"need at least 2 spectra to train, the shards hold {len(flux)}")
    fingerprint = {
        "shards": [p.name for p in shards],
        "rows": [pq.read_metadata(p).num_rows for p in shards],
        "max_spectra": max_spectra,
        "split": split,
    }
    order = rng.permutation(len(flux))
    n_val = min(max(1, round(config.val_fraction * len(flux))), len(flux) - 1)
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]

    torch.manual_seed(config.seed)
    model = SpectrumVAE(config)
    model.set_grid(RestFrameGrid.from_dict(grid).centres)
    with torch.no_grad():
        offset = mean_spectrum(flux[train_idx], ivar[train_idx])
        model.offset.copy_(torch.from_numpy(offset))
        sample = train_idx[:PCA_INIT_ROWS]  # shuffled: a random sample
        eigen = principal_spectra(flux[sample], ivar[sample], offset, config.linear_dim)
        model.eigen.copy_(torch.from_numpy(eigen))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    noise = torch.Generator().manual_seed(config.seed)
    weight = torch.from_numpy(line_pixel_weight(config, RestFrameGrid.from_dict(grid).centres)).to(
        device
    )
    state: dict[str, Any] = {
        "epoch": 0,
        "best_epoch": -1,
        "best_val_loss": float("inf"),
        "epochs_since_best": 0,
        "finished": False,
        "history": [],
        "best_model_state": None,
        "trained_targetids": torch.from_numpy(np.sort(targetid[train_idx])),
    }
    saved = _read_checkpoint(path, accept_older=True) if resume and path.exists() else None
    if saved is not None and saved["format_version"] < CHECKPOINT_VERSION:
        warnings.warn(
            f"{path}: checkpoint written by an older version (format {saved['format_version']}, "
            f"now {CHECKPOINT_VERSION}); training anew",
            stacklevel=2,
        )
    elif saved is not None:
        _check_resumable(path, saved, config, grid, fingerprint)
        if saved["finished"]:
            return path
        model.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer_state"])
        noise.set_state(saved["rng"]["torch"])
        rng.bit_generator.state = saved["rng"]["numpy"]
        state = {k: saved[k] for k in state}

    def to_device(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(flux[idx]).to(device), torch.from_numpy(ivar[idx]).to(device)

    while not state["finished"]:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, state["epoch"])
        model.train()
        total, pixels = 0.0, 0
        for idx in _batches(rng.permutation(train_idx), config.batch_size):
            f, iv = to_device(idx)
            loss = vae_loss(model, f, iv, weight, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n_good = int((iv > 0).sum())
            total, pixels = total + loss.item() * n_good, pixels + n_good
        val_loss = _evaluate(model, to_device, val_idx, weight, config.batch_size)
        state["epoch"] += 1
        if val_loss < state["best_val_loss"]:
            state.update(best_epoch=state["epoch"], best_val_loss=val_loss, epochs_since_best=0)
            state["best_model_state"] = _cpu_state(model)
        else:
            state["epochs_since_best"] += 1
        state["finished"] = (
            state["epoch"] >= config.epochs or state["epochs_since_best"] >= config.patience
        )
        record = {
            "epoch": state["epoch"],
            "train_loss": total / max(pixels, 1),
            "val_loss": val_loss,
            "seconds": time.perf_counter() - start,
        }
        state["history"] = [*state["history"], record]
        if state["finished"]:
            best = state["best_model_state"]
            held = order[: min(n_val, NOISE_ROWS)]  # validation: it fits its own spectra too well
            best["extra_var"], best["extra_var_edges"] = measure_extra_var(
                config, best, flux[held], ivar[held], redshift[held], grid
            )
        _write_checkpoint(path, model, optimizer, config, grid, fingerprint, state, rng, noise)
        if progress is not None:
            progress(record)
    return path


def measure_extra_var(
    config: VAEConfig,
    weights: dict[str, torch.Tensor],
    flux: np.ndarray,
    ivar: np.ndarray,
    redshift: np.ndarray,
    grid: dict[str, Any],
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``extra_var`` and ``extra_var_edges`` buffers of the model with ``weights``, measured
    on cleaned spectra of quasars at ``redshift`` (``noise.excess_variance_by_redshift``; forest
    and red side pooled separately)."""
    model = SpectrumVAE(config)
    model.load_state_dict(weights)
    model.eval()
    recon = np.concatenate(
        [
            model.fit_spectra(torch.from_numpy(flux[i : i + batch_size]),
                              torch.from_numpy(ivar[i : i + batch_size]),
                              torch.from_numpy(redshift[i : i + batch_size]))[0].numpy()
            for i in range(0, len(flux), batch_size)
        ]
    )  # fmt: skip
    rest = RestFrameGrid.from_dict(grid)
    extra, edges = excess_variance_by_redshift(
        flux, ivar, recon, redshift,
        regions=model.forest_pixels(rest.centres),
        smooth_pixels=round(NOISE_SMOOTH_KMS / rest.velocity_per_pixel),
        prior=model.extra_variance(None).numpy(),
        max_bins=EXTRA_VAR_ROWS,
    )  # fmt: skip
    model.set_extra_var(extra, edges)
    return model.extra_var.clone(), model.extra_var_edges.clone()


def learning_rate(config: VAEConfig, epoch: int) -> float:
    """Cosine decay from ``lr`` at epoch 0 to ``lr * lr_final_fraction`` at ``epochs`` (a
    function of the epoch alone, so a resumed training follows the same schedule)."""
    progress = min(epoch / max(config.epochs, 1), 1.0)
    low = config.lr * config.lr_final_fraction
    return float(low + 0.5 * (config.lr - low) * (1.0 + np.cos(np.pi * progress)))


def mean_spectrum(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """(npix,) median over the spectra with data at each pixel (1 where none has data): the
    decoder's starting offset, so training begins from the mean spectrum, not from zero."""
    values = np.where(ivar > 0, flux, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixel columns
        median = np.nanmedian(values, axis=0)
    return np.where(np.isfinite(median), median, 1.0).astype(np.float32)


def principal_spectra(flux: np.ndarray, ivar: np.ndarray, offset: np.ndarray, k: int) -> np.ndarray:
    """(npix, k) leading principal components of ``flux - offset`` (0 where there is no data),
    each scaled by its standard deviation so unit coefficients are typical: the eigenspectra's
    starting point."""
    resid = np.where(ivar > 0, flux - offset, 0.0).astype(np.float64)
    eigen = np.zeros((flux.shape[1], k), dtype=np.float32)
    if k == 0 or len(resid) < 2:
        return eigen
    _, sv, vt = np.linalg.svd(resid, full_matrices=False)
    m = min(k, len(sv))
    eigen[:, :m] = (vt[:m] * (sv[:m, None] / np.sqrt(len(resid)))).T
    return eigen


def _batches(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(idx), size):
        yield np.sort(idx[i : i + size])


@torch.no_grad()
def _evaluate(model, to_device, idx: np.ndarray, weight: torch.Tensor, batch_size: int) -> float:
    """Loss per good pixel of ``idx`` with the latent at the posterior mean (deterministic)."""
    model.eval()
    total, pixels = 0.0, 0
    for batch in _batches(idx, batch_size):
        f, iv = to_device(batch)
        n_good = int((iv > 0).sum())
        total += float(vae_loss(model, f, iv, weight)) * n_good
        pixels += n_good
    return total / max(pixels, 1)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _write_checkpoint(path, model, optimizer, config, grid, fingerprint, state, rng, noise):
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "code_version": __version__,
        "config": config.to_dict(),
        "grid": grid,
        "training_data": fingerprint,
        "model_state": _cpu_state(model),
        "optimizer_state": copy.deepcopy(optimizer.state_dict()),
        "rng": {"numpy": rng.bit_generator.state, "torch": noise.get_state()},
        **state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _read_checkpoint(path: Path, *, accept_older: bool = False) -> dict[str, Any]:
    """The checkpoint's payload; CheckpointError unless it is of this code's format version (or,
    with ``accept_older``, an older one: the caller retrains)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file does not exist") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable VAE checkpoint ({exc})") from exc
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a desi-anomaly VAE checkpoint")
    version = saved.get("format_version")
    older = accept_older and isinstance(version, int) and version < CHECKPOINT_VERSION
    if version != CHECKPOINT_VERSION and not older:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not the "
            f"supported version {CHECKPOINT_VERSION}; retrain the VAE"
        )
    return saved


def _check_resumable(path, saved, config, grid, fingerprint) -> None:
    problems = []
    if saved["config"] != config.to_dict():
        problems.append("its config differs from the requested one")
    if not same_grid(saved["grid"], grid):
        problems.append("its rest-frame grid differs from that of the shards")
    if saved["training_data"] != fingerprint:
        problems.append("it was trained on other shards or another max_spectra")
    if problems:
        raise CheckpointMismatchError(
            f"{path}: cannot resume: {'; '.join(problems)}. Pass resume=False to start over "
            "or use another output folder"
        )


def load_checkpoint(
    path: str | Path, *, grid: dict[str, Any] | None = None, device: str = "cpu"
) -> TrainedVAE:
    """Load the best model of a checkpoint for encoding.

    Raises CheckpointError (naming the file) when the file is not a usable checkpoint, its config
    does not fit its weights, or ``grid`` is given and differs from the checkpoint's grid.
    """
    path = Path(path)
    saved = _read_checkpoint(path)
    try:
        config = VAEConfig.from_dict(saved["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid VAE config in checkpoint ({exc})") from exc
    if int(saved["grid"]["npix"]) != config.npix:
        raise CheckpointError(
            f"{path}: config.npix {config.npix} does not match the grid's {saved['grid']['npix']}"
        )
    if grid is not None and not same_grid(saved["grid"], grid):
        raise CheckpointError(
            f"{path}: the checkpoint was trained on rest-frame grid {saved['grid']}, "
            f"not on {grid}; retrain or preprocess onto the checkpoint's grid"
        )
    weights = saved["best_model_state"] or saved["model_state"]
    model = SpectrumVAE(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the config ({exc})") from exc
    return TrainedVAE(
        model.to(device).eval(),
        config,
        saved["grid"],
        path,
        file_sha256(path),
        saved["history"],
        saved["trained_targetids"].numpy(),
    )
