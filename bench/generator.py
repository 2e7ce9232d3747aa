"""Realistic events for the read-side benchmarks, made by the real aggregates.

Each dataset is registered, then goes through metadata entries, published versions,
quality checks and descriptions, so payload sizes and the mix of event types are those
of the service. The events are encoded and given headers exactly as the command
processor does (`commands.serialization.to_record`), then produced to
`<prefix>.events.datasets`, keyed by aggregate id like the real thing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from aiokafka import AIOKafkaProducer

from commands.datasets import CONTEXT as DATASETS
from commands.datasets.aggregate import Dataset
from commands.serialization import EventRecord, to_record
from shared_kernel import kafka
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import CommandEnvelope
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics

WORDS = [
    "hourly",
    "daily",
    "surface",
    "ocean",
    "river",
    "basin",
    "station",
    "gauge",
    "satellite",
    "radar",
    "sensor",
    "quality",
    "controlled",
    "gridded",
    "reanalysis",
    "observations",
    "temperature",
    "pressure",
    "humidity",
    "wind",
    "rainfall",
    "snow",
    "soil",
    "moisture",
    "orders",
    "customers",
    "products",
    "prices",
    "deliveries",
    "clicks",
    "sessions",
]


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(n))


def _dataset(d: int, per_dataset: int) -> Dataset:
    dataset = Dataset.register(
        uuid.uuid4(),
        name=f"{_text(d, 3).title()} {d}",
        description=f"{_text(d + 1, 12)}, from {d % 900 + 100} stations, quality controlled.",
        owner=f"team-{d % 25}",
        tags=[WORDS[d % len(WORDS)], WORDS[(d + 5) % len(WORDS)]],
        metadata={"license": "CC-BY-4.0", "rows": d * 1000, "format": "parquet"},
    )
    for i in range(1, per_dataset):
        match i % 4:
            case 1:
                dataset.set_metadata(f"k{i % 12}", {"rows": i * 1000, "checked": True, "by": f"job-{i}"})
            case 2:
                dataset.publish_version(f"1.{i}.0", f"release {i}: {_text(i, 6)}")
            case 3:
                dataset.record_quality_check("completeness", 0.9 + (i % 10) / 100, 0.95, ">=")
            case _:
                dataset.describe(None, f"{_text(d + i, 14)} (revision {i}).")
    return dataset


def dataset_events(datasets: int, per_dataset: int, live: int = 1) -> Iterator[EventRecord]:
    """`datasets` x `per_dataset` events: a registration, then a cycle of changes. With
    `live` > 1, that many datasets change at the same time: their events interleave in
    the log (as they do in production), each dataset's in order."""
    codec = AvroCodec.from_directory()
    for first in range(0, datasets, live):
        window = [_dataset(d, per_dataset) for d in range(first, min(first + live, datasets))]
        events = [d.collect_events() for d in window]
        for step in range(per_dataset):
            for dataset, its in zip(window, events, strict=True):
                envelope = CommandEnvelope(
                    command_id=str(uuid.uuid4()),
                    command_type="bench",
                    aggregate_id=str(dataset.id),
                    payload={},
                    actor="bench",
                    tenant="bench",  # the tenant of the benchmarks' tokens (bench.common.bearer)
                )
                yield to_record(DATASETS, codec, its[step], envelope)


async def produce_dataset_events(
    settings: Settings, events: int, per_dataset: int = 20, progress: bool = True, live: int = 1
) -> int:
    """Produce about `events` dataset events under the settings' prefix; returns how many."""
    topic = Topics(settings.topic_prefix).events("datasets")
    producer: AIOKafkaProducer = kafka.producer(settings, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    sent, started, last = 0, time.monotonic(), time.monotonic()
    try:
        pending = []
        for record in dataset_events(max(1, events // per_dataset), per_dataset, live):
            pending.append(
                await producer.send(topic, record.value, key=record.key, headers=list(record.headers))
            )
            sent += 1
            if len(pending) >= 5000:
                for f in pending:
                    await f
                pending.clear()
            if progress and time.monotonic() - last > 5:
                last = time.monotonic()
                print(f"  produced {sent:,} events ({sent / (last - started):,.0f}/s)", flush=True)
        for f in pending:
            await f
    finally:
        await producer.stop()
    return sent
