"""Which failures of a batch are the store's (retried as they are) and which are the
event's (a dead letter): a store that is away, restarting or overloaded must never turn
the events of the moment into dead letters."""

from __future__ import annotations

import asyncpg
import opensearchpy
import pytest

from projections.projector import unavailable
from projections.search import BulkItemFailed


@pytest.mark.parametrize(
    "fault",
    [
        ConnectionResetError(),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.ProgramLimitExceededError("too many notifications in the NOTIFY queue"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.LockNotAvailableError("could not obtain lock"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.UndefinedTableError('relation "datasets_v1" does not exist'),
        asyncpg.InsufficientPrivilegeError("permission denied for table datasets_v1"),
        opensearchpy.TransportError(404, "index_not_found_exception", {}),
        opensearchpy.TransportError(403, "cluster_block_exception", {}),
        opensearchpy.ConnectionError("N/A", "connection refused", None),
        opensearchpy.ConnectionTimeout("TIMEOUT", "read timed out", None),
        opensearchpy.TransportError(429, "es_rejected_execution_exception", {}),
        opensearchpy.TransportError(503, "cluster_block_exception", {}),
        BulkItemFailed("2 document(s) refused: es_rejected_execution_exception", busy=True),
    ],
    ids=lambda f: type(f).__name__,
)
def test_a_store_away_or_busy_is_retried_not_dead_lettered(fault: BaseException) -> None:
    assert unavailable(fault)


@pytest.mark.parametrize(
    "fault",
    [
        ValueError("a poison event"),
        asyncpg.ProgramLimitExceededError("index row size 9000 exceeds maximum 2712"),
        asyncpg.UntranslatableCharacterError("unsupported Unicode escape sequence"),
        asyncpg.NotNullViolationError("null value in column"),
        opensearchpy.TransportError(400, "mapper_parsing_exception", {}),
        BulkItemFailed("1 document(s) refused: mapper_parsing_exception"),
    ],
    ids=lambda f: type(f).__name__,
)
def test_what_the_store_refuses_for_the_event_itself_is_a_dead_letter(fault: BaseException) -> None:
    assert not unavailable(fault)
