"""How large a Kafka record is, as the producer and the broker count it.

A topic refuses a record batch over its `max.message.bytes` (`APP_KAFKA_MAX_MESSAGE_BYTES`,
Kafka's default 1,048,588), and aiokafka refuses a record whose batch would exceed its
`max_request_size` before sending anything. Both are checked here with aiokafka's own
upper bound of a record batch holding that one record (batch header, the worst-case
varints, key, value, headers), so a record that passes the check is one that Kafka
takes: the producers batch several records only up to 256 KiB, the least that the
setting allows, and a larger record travels in a batch of its own.

What is checked where: the API's body limit (api.limits), the command envelope before
it is produced (commands.bus), the events and snapshots of a command in the batch
decision (commands.batch), the dead letters in the transaction (commands.transaction).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.record.default_records import DefaultRecordBatchBuilder

# Kafka's default `max.message.bytes` (1 MiB + the 12 bytes of log overhead); aiokafka's
# default `max_request_size` is 1,048,576 and a producer that keeps it is the tighter limit.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
AIOKAFKA_DEFAULT_MAX_REQUEST_SIZE = 1_048_576


def record_size(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] = ()
) -> int:
    """The bytes of a record batch holding just this record (an upper bound)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


class TooLarge(ValueError):
    """A record that no topic of this service would take."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} would be {size:,} bytes; Kafka takes at most {limit:,}")
        self.what, self.size, self.limit = what, size, limit
