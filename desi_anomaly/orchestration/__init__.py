"""The Dagster layer of desi-anomaly: assets, checks, resources, sensors and jobs over the science
library (which knows nothing of Dagster). The entry point is ``definitions.defs``; ``run_all``
materialises the whole graph on a data root from Python or the command line."""

from __future__ import annotations

__all__ = ["run_all"]


def __getattr__(name: str):
    if name == "run_all":
        from .run import run_all

        return run_all
    raise AttributeError(name)
