"""Every stream-processing job by name: the one list to change when a context adds one."""

from __future__ import annotations

from streams.datasets.legacy_catalog import LegacyCatalog
from streams.datasets.quality_monitor import QualityMonitor
from streams.incidents.deadlines import Deadlines
from streams.incidents.quality_incidents import QualityIncidents
from streams.jobs import Job
from streams.webhooks.delivery import WebhookDelivery

JOBS: dict[str, type[Job]] = {
    job.name: job for job in (QualityMonitor, QualityIncidents, Deadlines, LegacyCatalog, WebhookDelivery)
}
