"""Benchmark: VAE reconstruction accuracy, training and encoding speed on a mock drop.

Generates (or reuses) a mock drop without anomalies, ingests it into cleaned shards, trains the
VAE on 80% of the partitions and encodes the other 20% (held out: never seen in training):

- reconstruction accuracy: share of held-out normal spectra with reduced chi2 < 1.5 (target 95%);
- training seconds per epoch per 10k spectra (``--threads`` torch threads);
- encoding spectra/s on one CPU core (one torch thread);
- peak RSS of the process.

Figures are printed and written to ``{data}/bench_vae.json``.

    python benchmarks/bench_vae.py --tiles 30 --per-tile 120 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, update_section

from desi_anomaly.ingest import clean_partitions
from desi_anomaly.io.partitions import discover
from desi_anomaly.ml import VAEConfig, encode_shard, load_checkpoint, train_vae
from desi_anomaly.preprocess import RestFrameGrid
from desi_anomaly.shards import read_shard

REPO = Path(__file__).resolve().parents[1]
RCHI2_GOOD = 1.5


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(data: Path, tiles: int, per_tile: int) -> list[Path]:
    """Mock drop (no anomalies) -> cleaned shards; reused when already there."""
    drop = data / "drop"
    if not drop.exists():
        from desi_anomaly.mock import generate_drop

        start = time.perf_counter()
        generate_drop(drop, tiles, per_tile, seed=7, others_per_tile=20, anomaly_fraction=0.0)
        print(f"generated {tiles} x {per_tile} QSOs in {time.perf_counter() - start:.0f} s")
    shards = sorted((data / "cleaned").glob("*.parquet"))
    if not shards:
        results = clean_partitions(discover(drop).complete, data)
        shards = sorted(r.shard for r in results if r.ok)
    return shards


def normal_targetids(data: Path) -> np.ndarray:
    """TARGETIDs of the mock QSOs without an injected anomaly."""
    truth = pd.read_parquet(data / "drop" / "truth.parquet")
    return truth.loc[truth["ANOMALY"] == "none", "TARGETID"].to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=30, help="healpix files in the mock drop")
    ap.add_argument("--per-tile", type=int, default=120, help="QSOs per healpix file")
    ap.add_argument("--epochs", type=int, default=VAEConfig.epochs)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "bench-vae")
    ap.add_argument("--fresh", action="store_true", help="retrain even if a checkpoint exists")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = ap.parse_args()

    shards = prepare(args.data, args.tiles, args.per_tile)
    n_held = max(1, len(shards) // 5)
    train_shards, held_shards = shards[:-n_held], shards[-n_held:]
    config = VAEConfig(epochs=args.epochs)
    torch.set_num_threads(args.threads)
    print(f"training on {len(train_shards)} partitions, {args.threads} threads: {config}")
    start = time.perf_counter()
    checkpoint = train_vae(
        train_shards,
        args.data / "vae",
        config,
        resume=not args.fresh,
        progress=lambda r: print(
            f"  epoch {r['epoch']}: train {r['train_loss']:.4f} val {r['val_loss']:.4f} "
            f"({r['seconds']:.1f} s)"
        ),
    )
    train_seconds = time.perf_counter() - start
    vae = load_checkpoint(checkpoint)
    n_train = sum(len(read_shard(p).meta) for p in train_shards)
    epoch_seconds = float(np.mean([h["seconds"] for h in vae.history]))

    torch.set_num_threads(1)
    normal = normal_targetids(args.data)
    tables, n_encoded, encode_seconds = [], 0, 0.0
    held_data = [read_shard(path) for path in held_shards]
    for shard in held_data:
        start = time.perf_counter()
        tables.append(encode_shard(vae, shard).to_pandas())
        encode_seconds += time.perf_counter() - start
        n_encoded += len(shard)
    held = pd.concat(tables)
    held = held[held["TARGETID"].isin(normal)]
    rchi2 = held["RECON_RCHI2"].to_numpy()
    # the same spectra with the training prior's extra variance instead of the measured one
    wave = RestFrameGrid.from_dict(vae.grid).centres
    forest = vae.model.forest_pixels(wave)
    n_bins = int(np.isfinite(vae.model.extra_var_edges.numpy()).sum()) + 1
    measured = vae.model.extra_var.numpy()[:n_bins].copy()  # one row per redshift bin
    covered = sum((shard.ivar > 0).sum(axis=0) for shard in held_data) >= 50
    vae.model.set_grid(wave)
    prior = pd.concat([encode_shard(vae, shard).to_pandas() for shard in held_data])
    rchi2_prior = prior.loc[prior["TARGETID"].isin(normal), "RECON_RCHI2"].to_numpy()
    figures = {
        "machine": machine(),
        "config": config.to_dict(),
        "n_train_spectra": n_train,
        "n_heldout_normal": len(held),
        "epochs_run": len(vae.history),
        "best_val_loss": min(h["val_loss"] for h in vae.history),
        "reconstruction_accuracy": float(np.mean(rchi2 < RCHI2_GOOD)),
        "rchi2_quantiles": {f"p{q}": float(np.quantile(rchi2, q / 100)) for q in (50, 90, 95, 99)},
        "reconstruction_accuracy_prior_noise": float(np.mean(rchi2_prior < RCHI2_GOOD)),
        "extra_var_redshift_bins": n_bins,
        "extra_var_forest_median": float(np.median(measured[:, forest & covered])),
        "extra_var_red_median": float(np.median(measured[:, ~forest & covered])),
        "train_threads": args.threads,
        "train_seconds_total": train_seconds,
        "train_seconds_per_epoch_per_10k": epoch_seconds * 1e4 / n_train,
        "encode_spectra_per_s_per_core": n_encoded / encode_seconds,
        "peak_rss_mib": _peak_mib(),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    (args.data / "bench_vae.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps({k: v for k, v in figures.items() if k != "config"}, indent=2))
    update_section(args.doc, "vae", _markdown(args, figures))


def _markdown(args: argparse.Namespace, f: dict) -> str:
    q = f["rchi2_quantiles"]
    rows = [
        ("held-out normal spectra", f["n_heldout_normal"]),
        ("epochs run", f["epochs_run"]),
        (
            f"reconstruction accuracy (reduced chi2 < {RCHI2_GOOD}; target 95%)",
            f"{f['reconstruction_accuracy']:.1%}",
        ),
        ("reduced chi2 p50 / p90 / p95 / p99", " / ".join(f"{v:.2f}" for v in q.values())),
        (
            "accuracy with the training prior's noise model instead (forest_var in the forest, "
            "nothing elsewhere)",
            f"{f['reconstruction_accuracy_prior_noise']:.1%}",
        ),
        (
            "measured extra variance / model^2, median over its "
            f"{f['extra_var_redshift_bins']} quasar-redshift bins and the pixels with >= 50 "
            "held-out spectra: forest / red side",
            f"{f['extra_var_forest_median']:.4f} / {f['extra_var_red_median']:.1e}",
        ),
        (
            f"training s per epoch per 10k spectra ({f['train_threads']} threads)",
            f"{f['train_seconds_per_epoch_per_10k']:.1f}",
        ),
        ("encoding spectra/s on one core", f"{f['encode_spectra_per_s_per_core']:.0f}"),
        ("peak RSS (MiB)", f"{f['peak_rss_mib']:.0f}"),
        (
            "load average at the end (other jobs share the 2 cores)",
            f"{f['load_average_1min_at_end']:.1f}",
        ),
    ]
    table = "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return f"""## VAE: reconstruction accuracy, training and encoding speed

Command: `python benchmarks/bench_vae.py --tiles {args.tiles} --per-tile {args.per_tile}
--epochs {args.epochs} --threads {args.threads}` ({f["machine"]}). Mock drop without anomalies;
the VAE (default config: {f["config"]["latent_dim"]}-d latent, {f["config"]["npix"]} pixels)
trains on 80% of the partitions ({f["n_train_spectra"]} spectra) and encodes the other 20%.
A rerun without `--fresh` reuses a finished checkpoint (training figures from its history) and
measures the encoding again. Reduced chi2 is chi2 / (good pixels) with the pipeline's noise model
(pipeline ivar plus the extra variance measured after training, `desi_anomaly.ml.noise`), not
subtracting the
{f["config"]["linear_dim"]} eigenspectrum coefficients solved per spectrum from the degrees of
freedom.

{table}
"""


if __name__ == "__main__":
    main()
