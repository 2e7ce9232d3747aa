"""The datasets bounded context: a catalogue of datasets, their metadata, versions and quality."""

from __future__ import annotations

from commands.context import BoundedContext
from commands.datasets.aggregate import Dataset
from commands.datasets.handlers import HANDLERS

CONTEXT = BoundedContext(
    name="datasets",
    aggregate=Dataset,
    handlers=HANDLERS,
    event_names=(
        "DatasetRegistered",
        "DatasetDescribed",
        "MetadataSet",
        "MetadataRemoved",
        "VersionPublished",
        "QualityCheckRecorded",
        "DatasetArchived",
        "DatasetQualityDegraded",
        "DatasetQualityRestored",
    ),
)
