"""The incidents bounded context (ITSM): incidents, assignment, status life cycle, comments."""

from __future__ import annotations

from commands.context import BoundedContext
from commands.incidents.aggregate import Incident
from commands.incidents.handlers import HANDLERS

CONTEXT = BoundedContext(
    name="incidents",
    aggregate=Incident,
    handlers=HANDLERS,
    event_names=(
        "IncidentOpened",
        "IncidentAssigned",
        "IncidentStatusChanged",
        "IncidentCommented",
        "IncidentEscalated",
    ),
)
