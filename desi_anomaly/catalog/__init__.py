"""The anomaly catalog: ranked table and its outputs, similarity search, explanations and plots.

from desi_anomaly.catalog import build_catalog, write_outputs
catalog = build_catalog(scores, clusters, alpha=0.01, checkpoint_sha256=sha)
write_outputs(out_dir, score_batches, catalog, provenance={"alpha": 0.01, ...})
"""

from .build import (
    ANOMALY_TYPES,
    CATALOG_COLUMNS,
    FEATURE_COLUMNS,
    UNITS,
    CatalogError,
    build_catalog,
    followup_priority,
)
from .explain import DrivingRegion, Explanation, explain, explain_catalog, regions_table
from .plots import plot_anomaly, plot_summary_grid, plot_top_anomalies
from .similarity import SimilarityError, build_latents_db, similar
from .writers import catalog_table, write_outputs, write_scores_parquet

__all__ = [
    "ANOMALY_TYPES",
    "CATALOG_COLUMNS",
    "FEATURE_COLUMNS",
    "UNITS",
    "CatalogError",
    "DrivingRegion",
    "Explanation",
    "SimilarityError",
    "build_catalog",
    "build_latents_db",
    "catalog_table",
    "explain",
    "explain_catalog",
    "followup_priority",
    "plot_anomaly",
    "plot_summary_grid",
    "plot_top_anomalies",
    "regions_table",
    "similar",
    "write_outputs",
    "write_scores_parquet",
]
