"""Webhook subscriptions: registration's checks, the life cycle, secret rotation, and
the signing the delivery job does (verified by the Standard Webhooks library)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from commands.webhooks import CONTEXT
from commands.webhooks import commands as c
from commands.webhooks import signing as w
from shared_kernel.domain import InvalidCommand, InvariantViolation
from tests.unit.scenario import T0, Scenario

ID = uuid4()


def registered() -> Scenario:
    return Scenario(CONTEXT).given(c.RegisterWebhook(ID, "https://hooks.example.com/in", ["incidents"]))


def test_registering_keeps_the_target_and_its_filters_sorted_and_unique() -> None:
    events = Scenario(CONTEXT).when(
        c.RegisterWebhook(
            ID,
            " https://hooks.example.com/in?x=1 ",
            ["incidents", "datasets", "incidents"],
            ["incidents.IncidentOpened"],
            "pager",
        )
    )
    assert events == [
        (
            "WebhookRegistered",
            {
                "url": "https://hooks.example.com/in?x=1",
                "contexts": ["datasets", "incidents"],
                "event_types": ["incidents.IncidentOpened"],
                "description": "pager",
            },
        )
    ]


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (c.RegisterWebhook(ID, "ftp://hooks.example.com/in"), "url"),
        (c.RegisterWebhook(ID, "https://user:pw@hooks.example.com/in"), "url"),
        (c.RegisterWebhook(ID, "https:///in"), "url"),
        (c.RegisterWebhook(ID, "https://hooks.example.com:99999/"), "url"),
        (c.RegisterWebhook(ID, "https://hooks.example.com/" + "a" * 2048), "url"),
        (c.RegisterWebhook(ID, "https://hooks.example.com/", ["billing"]), "contexts"),
        (c.RegisterWebhook(ID, "https://hooks.example.com/", [], ["incidents.Nope"]), "event_types"),
    ],
)
def test_registration_refuses_what_cannot_be_delivered_naming_the_field(command: object, field: str) -> None:
    with pytest.raises(InvalidCommand) as err:
        Scenario(CONTEXT).when(command)
    assert err.value.details["field"] == field


def test_pause_resume_and_the_failing_and_disabled_states() -> None:
    s = registered()
    s.when(c.PauseWebhook(ID, "maintenance"))
    with pytest.raises(InvariantViolation):
        s.when(c.PauseWebhook(ID))
    with pytest.raises(InvariantViolation):
        s.when(c.MarkWebhookFailing(ID, "timed out", "2026-12-01T10:00:00+00:00"))  # only an active one fails
    assert s.when(c.ResumeWebhook(ID)) == [("WebhookResumed", {"from_status": "paused"})]
    s.when(c.MarkWebhookFailing(ID, "timed out", "2026-12-01T10:00:00+00:00"))
    assert s.state.status == "failing"
    s.when(c.ResumeWebhook(ID))
    s.when(c.DisableWebhook(ID, "410 Gone"))
    with pytest.raises(InvariantViolation):
        s.when(c.DisableWebhook(ID, "410 Gone"))
    assert s.when(c.ResumeWebhook(ID)) == [("WebhookResumed", {"from_status": "disabled"})]


def test_a_deleted_webhook_accepts_nothing() -> None:
    s = registered().given(c.DeleteWebhook(ID))
    for command in (c.ResumeWebhook(ID), c.PauseWebhook(ID), c.RotateWebhookSecret(ID), c.DeleteWebhook(ID)):
        with pytest.raises(InvariantViolation):
            s.when(command)


def test_rotation_counts_generations_and_keeps_the_previous_for_the_overlap() -> None:
    s = registered().given(c.PauseWebhook(ID))
    events = s.when(c.RotateWebhookSecret(ID, overlap_s=3600))  # at the scenario's clock, T0
    until = (T0 + timedelta(hours=1)).isoformat()
    rotated = {"generation": 3, "previous_generation": 1, "previous_until": until}  # its own version
    assert events == [("WebhookSecretRotated", rotated)]
    assert s.when(c.RotateWebhookSecret(ID, overlap_s=0))[0][1]["previous_generation"] == 3
    with pytest.raises(InvalidCommand) as err:
        s.when(c.RotateWebhookSecret(ID, overlap_s=-1))
    assert err.value.details["field"] == "overlap_s"


def test_signatures_verify_with_either_secret_during_a_rotation_and_not_with_another() -> None:
    old, new = (w.secret_of("server-key", "acme", str(ID), g) for g in (1, 2))
    assert old != new
    assert old.startswith("whsec_")
    assert w.secret_of("server-key", "acme", str(ID), 1) == old  # derived again, the same
    assert w.secret_of("server-key", "other", str(ID), 1) != old  # per tenant
    body = '{"type":"event"}'
    headers = w.headers(w.webhook_id_of(str(ID), "event-1"), body, [new, old])
    assert Webhook(new).verify(body, headers) == {"type": "event"}
    assert Webhook(old).verify(body, headers) == {"type": "event"}
    with pytest.raises(WebhookVerificationError):
        Webhook(w.secret_of("server-key", "acme", str(ID), 3)).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body + " ", headers)
    stale = w.headers("msg_1", body, [new], at=datetime.now(UTC) - timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body, stale)


def test_the_webhook_id_is_stable_per_subscription_and_event() -> None:
    assert w.webhook_id_of("s", "e") == w.webhook_id_of("s", "e")
    assert len({w.webhook_id_of("s", "e"), w.webhook_id_of("s", "f"), w.webhook_id_of("t", "e")}) == 3


@pytest.mark.parametrize(
    ("url", "allowed", "refused"),
    [
        ("http://127.0.0.1:9000/in", [], True),
        ("http://localhost/in", [], True),
        ("http://[::1]/in", [], True),
        ("http://[::ffff:10.0.0.1]/in", [], True),
        ("http://169.254.169.254/latest/meta-data", [], True),
        ("http://192.168.1.5/in", [], True),
        ("http://0.0.0.0/in", [], True),
        ("http://127.0.0.1:9000/in", ["127.0.0.0/8"], False),
        ("http://10.0.0.1/in", ["127.0.0.0/8"], True),
        ("https://93.184.215.14/in", [], False),
        ("https://hooks.example.com/in", [], False),  # a name: checked once resolved
    ],
)
def test_private_loopback_and_link_local_targets_are_refused_unless_allowed(
    url: str, allowed: list[str], refused: bool
) -> None:
    assert (w.refusal(url, allowed) is not None) is refused
