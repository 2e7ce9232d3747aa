"""`infra/stack.py`: healthy after `up`, nothing of ours left after `down`, and a second
`up` served from the caches (no download, no unpacking, no re-initialisation).

These tests stop and start the shared services, so `make test` runs them alone, last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import REPO

pytestmark = pytest.mark.stack

STACK = [sys.executable, str(REPO / "infra" / "stack.py")]
SERVICES = ("redis", "postgres", "kafka", "opensearch")
FIRST_TIME_WORK = ("resolving", "downloading", "unpacking", "initialising", "formatting", "installing")


def _stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STACK, *args], capture_output=True, text=True, timeout=600, check=False)


def _status() -> tuple[int, list[dict[str, object]]]:
    res = _stack("status", "--json", *SERVICES)
    return res.returncode, json.loads(res.stdout)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # zombies have an empty cmdline
    except OSError:
        return False


@pytest.fixture(scope="module", autouse=True)
def _local_stack_only() -> None:
    ours = dict(
        line.removeprefix("export ").split("=", 1) for line in _stack("env").stdout.splitlines() if line
    )
    given = os.environ.get("APP_KAFKA_BOOTSTRAP")
    if given and given != ours["APP_KAFKA_BOOTSTRAP"]:
        pytest.fail("the stack lifecycle tests manage the local stack; unset the APP_* endpoints to run them")


def test_status_is_healthy_after_up() -> None:
    up = _stack("up")
    assert up.returncode == 0, up.stderr
    code, rows = _status()
    assert code == 0
    assert {r["service"]: r["healthy"] for r in rows} == dict.fromkeys(SERVICES, True)


def test_down_stops_every_process_it_started_and_up_comes_back_from_the_cache() -> None:
    _, before = _status()
    pids = [int(str(r["pid"])) for r in before if r["pid"]]
    assert len(pids) == 4

    down = _stack("down")
    assert down.returncode == 0, down.stderr
    code, after = _status()
    assert code != 0
    assert all(not r["healthy"] and r["pid"] is None for r in after)
    assert [p for p in pids if _alive(p)] == []

    up = _stack("up")
    assert up.returncode == 0, up.stderr
    assert not [w for w in FIRST_TIME_WORK if w in up.stdout.lower()], up.stdout
    code, rows = _status()
    assert code == 0, rows
