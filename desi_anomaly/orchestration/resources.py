"""Dagster resources: where the DESI files are, where products go, the Ray runtime, and the
pipeline settings. Chosen by configuration (environment variables), never by code edits:

- ``DESI_ANOMALY_DATA_ROOT``: data root in the DESI release layout (``healpix/...``).
- ``DESI_ANOMALY_STORAGE_ROOT``: output root (cleaned shards, latents, model, scores, catalog).
- ``DESI_ANOMALY_DUCKDB_PATH``: where the catalog's DuckDB file is published (optional).
- ``DESI_ANOMALY_RAY_ADDRESS``: an existing Ray cluster (``ray://host:10001`` or ``auto``);
  unset means a local Ray runtime bound to 127.0.0.1, started per run and shut down after it.
- ``DESI_ANOMALY_RAY_NUM_CPUS``: CPUs of the local Ray runtime (default 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_ray import LocalRay, RayResource
from pydantic import Field, PrivateAttr

from desi_anomaly.discovery import Layout

DEFAULT_DATA_ROOT = "desi-anomaly-data"
DEFAULT_STORAGE_ROOT = "desi-anomaly-out"


class DataRootResource(dg.ConfigurableResource):
    """The data root holding DESI healpix coadd + redrock files in the release layout."""

    root: str = Field(description="Data root (contains healpix/{survey}/{program}/...)")

    @property
    def path(self) -> Path:
        return Path(self.root)


class StorageResource(dg.ConfigurableResource):
    """The output root of every data product, and where the catalog's DuckDB file is published."""

    root: str = Field(description="Output root: cleaned/, latents/, model/, scores/, catalog/")
    duckdb_path: str | None = Field(
        default=None,
        description="Copy the catalog DuckDB file here too (default: only under catalog/)",
    )

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.root))


class PipelineSettings(dg.ConfigurableResource):
    """Tunable settings of the discovery stages and the thresholds of the asset checks.

    ``vae_*`` fields left at None use the library defaults (``desi_anomaly.ml.vae.VAEConfig``).
    """

    vae_epochs: int | None = None
    vae_latent_dim: int | None = None
    vae_channels: list[int] | None = None
    vae_batch_size: int | None = None
    vae_seed: int | None = None
    max_train_spectra: int = 200_000
    alpha: float = Field(default=0.01, description="FDR level: a discovery has q < alpha")
    known_anomalies: str | None = Field(default=None, description="Known-anomaly list to match")
    injection_max_partitions: int = Field(
        default=50, description="Partitions whose spectra injection-recovery uses (first by key)"
    )
    injection_seed: int = 0
    # Asset-check thresholds.
    recon_rchi2_max: float = Field(default=1.5, description="'Well reconstructed' reduced chi2")
    recon_min_share: float = Field(
        default=0.95, description="Minimum share of held-out normal spectra reconstructed well"
    )
    max_drop_rate_per_reason: float = Field(
        default=0.5, description="Maximum fraction of read QSO spectra dropped for any one reason"
    )
    max_drop_rate_total: float = Field(
        default=0.8, description="Maximum fraction of read QSO spectra dropped in total"
    )
    min_ks_pvalue: float = Field(
        default=0.01, description="Calibration p-values fail uniformity below this KS p-value"
    )

    def vae_config(self):
        from desi_anomaly.ml.vae import VAEConfig

        overrides: dict[str, Any] = {
            "epochs": self.vae_epochs,
            "latent_dim": self.vae_latent_dim,
            "channels": tuple(self.vae_channels) if self.vae_channels else None,
            "batch_size": self.vae_batch_size,
            "seed": self.vae_seed,
        }
        return VAEConfig(**{k: v for k, v in overrides.items() if v is not None})


class LoopbackRay(LocalRay):
    """A local Ray runtime bound to 127.0.0.1 (``desi_anomaly.ml.raydispatch.init_ray``), started
    when a step needs it and shut down when the step ends. Reuses a runtime already connected in
    this process (and then leaves it running)."""

    num_cpus: int = Field(default=2, description="CPUs of the local Ray runtime")
    _started: bool = PrivateAttr(default=False)

    @property
    def name(self) -> str:
        return "LoopbackRay"

    def connect(self, context):
        import ray

        from desi_anomaly.ml.raydispatch import init_ray

        self._started = not ray.is_initialized()
        init_ray(None, num_cpus=self.num_cpus)
        return None

    @property
    def connected(self) -> bool:
        import ray

        return ray.is_initialized()

    def cleanup(self, context, exception):
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()
            if context.log is not None:
                context.log.info("Shut down the local Ray runtime")
        self._started = False


class RemoteRay(RayResource):
    """An existing Ray cluster (e.g. KubeRay) at ``address``: connected per step, never deleted."""

    address: str = Field(description="Ray address: ray://host:10001, or 'auto'")
    _connected_here: bool = PrivateAttr(default=False)

    @property
    def host(self) -> str:
        rest = self.address.split("://", 1)[-1]
        return rest.rsplit(":", 1)[0]

    @property
    def ray_address(self) -> str:  # type: ignore[override]
        return self.address

    @property
    def name(self) -> str:
        return f"Ray cluster at {self.address}"

    @property
    def created(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        return True

    @property
    def connected(self) -> bool:
        import ray

        return ray.is_initialized()

    def connect(self, context):
        import ray

        from desi_anomaly.ml.raydispatch import init_ray

        self._connected_here = not ray.is_initialized()
        init_ray(self.address)
        return None

    def cleanup(self, context, exception):
        import ray

        if self._connected_here and ray.is_initialized():
            ray.shutdown()  # disconnects this driver; the cluster keeps running
        self._connected_here = False


def ray_from_env(env: dict[str, str] | None = None) -> RayResource:
    """``RemoteRay`` when ``DESI_ANOMALY_RAY_ADDRESS`` is set, else a ``LoopbackRay``."""
    env = os.environ if env is None else env
    address = env.get("DESI_ANOMALY_RAY_ADDRESS", "").strip()
    if address:
        return RemoteRay(address=address)
    return LoopbackRay(num_cpus=int(env.get("DESI_ANOMALY_RAY_NUM_CPUS", "2")))


def resources_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Every resource of the pipeline, configured from environment variables."""
    env = os.environ if env is None else env
    data_root = env.get("DESI_ANOMALY_DATA_ROOT") or DEFAULT_DATA_ROOT
    storage_root = env.get("DESI_ANOMALY_STORAGE_ROOT") or DEFAULT_STORAGE_ROOT
    return {
        "data_root": DataRootResource(root=str(Path(data_root).absolute())),
        "storage": StorageResource(
            root=str(Path(storage_root).absolute()),
            duckdb_path=env.get("DESI_ANOMALY_DUCKDB_PATH") or None,
        ),
        "ray_cluster": ray_from_env(env),
        "settings": PipelineSettings(),
    }
