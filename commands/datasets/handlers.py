"""Command -> handler table of the datasets context: load, act, (the processor) save."""

from __future__ import annotations

from commands.context import acts_on, creates
from commands.datasets import commands as c
from commands.datasets.aggregate import Dataset

HANDLERS = (
    creates(
        c.RegisterDataset,
        lambda cmd: Dataset.register(
            cmd.dataset_id, cmd.name, cmd.description, cmd.owner, cmd.tags, cmd.metadata
        ),
    ),
    acts_on(c.DescribeDataset, lambda ds, cmd: ds.describe(cmd.name, cmd.description)),
    acts_on(c.SetMetadataEntry, lambda ds, cmd: ds.set_metadata(cmd.key, cmd.value)),
    acts_on(c.RemoveMetadataEntry, lambda ds, cmd: ds.remove_metadata(cmd.key)),
    acts_on(c.PublishVersion, lambda ds, cmd: ds.publish_version(cmd.version, cmd.notes)),
    acts_on(
        c.RecordQualityCheck,
        lambda ds, cmd: ds.record_quality_check(
            cmd.metric, cmd.value, cmd.threshold, cmd.comparator, cmd.measured_at
        ),
    ),
    acts_on(
        c.MarkQualityDegraded,
        lambda ds, cmd: ds.mark_quality_degraded(cmd.metric, cmd.figures, cmd.check_version),
    ),
    acts_on(
        c.MarkQualityRestored,
        lambda ds, cmd: ds.mark_quality_restored(cmd.metric, cmd.figures, cmd.check_version),
    ),
    acts_on(c.ArchiveDataset, lambda ds, cmd: ds.archive(cmd.reason)),
)
