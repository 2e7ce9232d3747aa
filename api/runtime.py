"""What runs, for the platform's operators (and the console): which instance owns each
command partition (the directory, `commands.routing`), and each stream job's consumer
group: its members, where it is in each source partition, and a halt waiting for a
person."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from fastapi import APIRouter, Request
from redis.exceptions import RedisError

from api.auth import permissions as p
from api.auth.access import requires
from api.errors import ReadModelsUnavailable
from shared_kernel import kafka
from shared_kernel.topics import Topics
from streams.jobs import halted
from streams.registry import JOBS

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])
TIMEOUT_S = 10
RESPONSES: dict[int | str, dict[str, Any]] = {503: {"description": "Kafka or Redis did not answer in time."}}


@router.get(
    "/processor",
    operation_id="getCommandPartitions",
    dependencies=[requires(p.ADMIN_RUNTIME)],
    responses=RESPONSES,
)
async def command_partitions(request: Request) -> dict[str, Any]:
    """Each command partition and the instance that owns it now (with its group
    generation), as the directory every API instance forwards commands by says."""
    directory = request.app.state.bus.directory
    try:
        await asyncio.wait_for(directory.refresh(), TIMEOUT_S)
    except (RedisError, OSError, TimeoutError) as exc:
        raise ReadModelsUnavailable(f"the partition directory could not be read: {exc!r}") from exc
    partitions = request.app.state.settings.partitions
    items: list[dict[str, Any]] = []
    for partition in range(partitions):
        owner = directory.owners.get(partition)
        items.append(
            {
                "partition": partition,
                "owner": None
                if owner is None
                else {"instance": owner.instance, "url": owner.url, "generation": owner.generation},
            }
        )
    instances = sorted({i["owner"]["instance"] for i in items if i["owner"]})
    return {"partitions": items, "instances": instances, "unowned": sum(1 for i in items if not i["owner"])}


@router.get("/jobs", operation_id="listJobs", dependencies=[requires(p.ADMIN_RUNTIME)], responses=RESPONSES)
async def list_jobs(request: Request) -> dict[str, Any]:
    """Each stream-processing job: its consumer group's state and members, its position,
    the end and the records behind in each source partition, and the error it halted on."""
    try:
        return {"jobs": await asyncio.wait_for(_jobs(request), TIMEOUT_S)}
    except (KafkaError, RedisError, OSError, TimeoutError) as exc:
        raise ReadModelsUnavailable(f"the jobs' state could not be read: {exc!r}") from exc


async def _jobs(request: Request) -> list[dict[str, Any]]:
    settings = request.app.state.settings
    topics = Topics(settings.topic_prefix)
    admin = kafka.admin(settings)
    await admin.start()
    try:
        out = []
        for name in sorted(JOBS):
            group = f"{settings.topic_prefix}.job.{name}"
            described = (await admin.describe_consumer_groups([group]))[0].groups[0]
            members = [{"client_id": m[1], "host": m[2]} for m in described[5]]
            committed = await admin.list_consumer_group_offsets(group)
            ends = await request.app.state.lag.ends(JOBS[name](settings).source_topics(topics))
            partitions = []
            for (topic, partition), end in sorted(ends.items()):
                meta = committed.get(TopicPartition(topic, partition))
                at = meta.offset if meta is not None and meta.offset >= 0 else None
                partitions.append(
                    {
                        "topic": topic,
                        "partition": partition,
                        "committed": at,
                        "end": end,
                        "behind": max(0, end - (at or 0)),
                    }
                )
            out.append(
                {
                    "name": name,
                    "group": group,
                    "state": described[2],
                    "members": members,
                    "behind": sum(x["behind"] for x in partitions),
                    "partitions": partitions,
                    "halted": await halted(request.app.state.bus.redis, settings.topic_prefix, name),
                }
            )
        return out
    finally:
        await admin.close()
