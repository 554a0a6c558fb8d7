"""The single Dagster entry point (``workspace.yaml`` loads ``defs`` from this module).

Resources come from environment variables (see ``resources.py``): a local Ray runtime on
127.0.0.1 unless ``DESI_ANOMALY_RAY_ADDRESS`` names a cluster, storage under
``DESI_ANOMALY_STORAGE_ROOT``, data under ``DESI_ANOMALY_DATA_ROOT``.
"""

from __future__ import annotations

import dagster as dg

from .assets import ASSETS
from .resources import resources_from_env
from .sensors import JOBS, SENSORS


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """The Definitions with the given resources (default: configured from the environment)."""
    return dg.Definitions(
        assets=ASSETS,
        jobs=JOBS,
        sensors=SENSORS,
        resources=resources if resources is not None else resources_from_env(),
    )


defs = build_definitions()
