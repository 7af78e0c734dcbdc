"""Synthetic head-CT phantoms with the five hemorrhage subtypes, written as ordinary CT DICOM.

Phantoms take exactly the path real data takes: they are files, read back by ``ichscan.dicom``; nothing
else in ichscan knows about them. ``generate_dataset`` writes a set; ``render_series`` draws one planned
series in memory (HU, lesion masks, anatomy) for tests and pictures. See docs/phantom.md.
"""

from ichscan.phantom.dataset import (
    DEFAULT_PREVALENCE,
    DatasetSummary,
    SeriesPlan,
    generate_dataset,
    parse_prevalence,
    plan_dataset,
    render_series,
)
from ichscan.phantom.series import PhantomSeries

__all__ = [
    "DEFAULT_PREVALENCE", "DatasetSummary", "PhantomSeries", "SeriesPlan", "generate_dataset",
    "parse_prevalence", "plan_dataset", "render_series",
]
