"""The datasets context's read models: the catalogue rows, the quality checks and
their event-time windows, search."""

from __future__ import annotations

from projections.context import ReadContext
from projections.datasets.quality import QualityMetricsProjection
from projections.datasets.rows import DatasetsProjection
from projections.datasets.search import DatasetsSearch
from projections.datasets.windows import QualityWindowsProjection

CONTEXT = ReadContext(
    "datasets",
    (DatasetsProjection(), QualityMetricsProjection(), QualityWindowsProjection(), DatasetsSearch()),
)
