"""Topic names and their contract configurations (the design's topic table).

`<prefix>.commands`, `<prefix>.events.<context>`, `<prefix>.state.<context>`,
`<prefix>.dlq.<consumer>`, `<prefix>.audit`. Events and state topics have as many partitions as the
commands topic: the same key lands in the same partition number everywhere, which
is what lets one processor own an aggregate's commands, events and state together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from shared_kernel import kafka
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
COMMAND_PROCESSOR = "command-processor"  # the write side's consumer name: its group, its dead letters


@dataclass(frozen=True)
class Topics:
    """The topic names for one prefix."""

    prefix: str

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    def events(self, context: str) -> str:
        return f"{self.prefix}.events.{context}"

    def state(self, context: str) -> str:
        return f"{self.prefix}.state.{context}"

    def audit(self, suffix: str = "audit") -> str:
        return f"{self.prefix}.{suffix}"

    def dlq(self, consumer: str) -> str:
        return f"{self.prefix}.dlq.{consumer}"

    def context_of_events(self, topic: str) -> str:
        return topic.removeprefix(f"{self.prefix}.events.")


def contract_topics(
    settings: Settings, contexts: Iterable[str], dlq_consumers: Iterable[str] = ()
) -> list[NewTopic]:
    """Every topic of the contract with its configuration."""
    t = Topics(settings.topic_prefix)
    n, rf = settings.partitions, settings.replication_factor
    size = _max_message_bytes(settings)
    wanted = [
        NewTopic(
            t.commands,
            n,
            rf,
            topic_configs={"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS), **size},
        )
    ]
    for ctx in contexts:
        wanted.append(
            NewTopic(
                t.events(ctx),
                n,
                rf,
                topic_configs={
                    "cleanup.policy": "delete",
                    "retention.ms": "-1",
                    "retention.bytes": "-1",
                    **size,
                },
            )
        )
        wanted.append(
            NewTopic(
                t.state(ctx),
                n,
                rf,
                topic_configs={
                    "cleanup.policy": "compact",
                    "min.cleanable.dirty.ratio": "0.1",
                    "segment.ms": str(DAY_MS),
                    **size,
                },
            )
        )
    wanted.extend(dlq_topic(settings, consumer) for consumer in dlq_consumers)
    wanted.append(
        NewTopic(
            t.audit(settings.audit_topic_suffix),
            n,
            rf,
            # the trail is kept a year (the admin query reads the copy in PostgreSQL)
            topic_configs={"cleanup.policy": "delete", "retention.ms": str(366 * DAY_MS), **size},
        )
    )
    return wanted


def dlq_topic(settings: Settings, consumer: str) -> NewTopic:
    """The dead-letter topic of one consumer (the command processor, a projection)."""
    return NewTopic(
        Topics(settings.topic_prefix).dlq(consumer),
        settings.partitions,
        settings.replication_factor,
        topic_configs={
            "cleanup.policy": "delete",
            "retention.ms": str(30 * DAY_MS),
            **_max_message_bytes(settings),
        },
    )


def _max_message_bytes(settings: Settings) -> dict[str, str]:
    """The largest record batch a topic takes: given explicitly, so the limit the write
    side checks before producing (`APP_KAFKA_MAX_MESSAGE_BYTES`) is the topic's own and
    not whatever the broker's `message.max.bytes` happens to be. Topics that exist
    already keep their configuration (see `ensure_topics`)."""
    return {"max.message.bytes": str(settings.kafka_max_message_bytes)}


async def ensure_topics(settings: Settings, topics: list[NewTopic]) -> list[str]:
    """Create the missing topics; existing ones are left as they are. Returns the names created."""
    admin = kafka.admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [nt for nt in topics if nt.name not in existing]
        if not missing:
            return []
        response = await admin.create_topics(missing)
        created, failed = [], []
        for topic, code, *message in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != TopicAlreadyExistsError.errno:  # another process may have been first
                failed.append(f"{topic}: error {code} {message[0] if message else ''}".strip())
        if failed:
            raise RuntimeError("could not create topics: " + "; ".join(failed))
        if created:
            log.info("topics created", extra={"topics": created})
        return created
    finally:
        await admin.close()
