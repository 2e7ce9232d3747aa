"""Command -> handler table of the incidents context."""

from __future__ import annotations

from commands.context import acts_on, creates
from commands.incidents import commands as c
from commands.incidents.aggregate import Incident

HANDLERS = (
    creates(
        c.OpenIncident,
        lambda cmd: Incident.open(
            cmd.incident_id, cmd.title, cmd.description, cmd.priority, cmd.source, cmd.external_id
        ),
    ),
    acts_on(c.AssignIncident, lambda inc, cmd: inc.assign(cmd.assignee)),
    acts_on(c.ChangeIncidentStatus, lambda inc, cmd: inc.change_status(cmd.status, cmd.reason)),
    acts_on(c.ReopenIncident, lambda inc, cmd: inc.reopen(cmd.reason)),
    acts_on(c.CommentOnIncident, lambda inc, cmd: inc.comment(cmd.author, cmd.body)),
    acts_on(c.EscalateIncident, lambda inc, cmd: inc.escalate(cmd.deadline, cmd.due_at)),
)
