"""The alert rules, and the loop closed on the real stack: the service's own alerts, from
a real Prometheus through a real Alertmanager (Debian's packages, which `infra/stack.py`
installs), open and resolve incidents in its own incidents context."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from shared_kernel import kafka
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.auth import token
from tests.integration.harness import WriteSide, free_port, until

RULES = Path(__file__).resolve().parents[2] / "infra" / "prometheus"
PROJECTORS_METRICS = free_port()  # where this module's projectors serve /metrics


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: infra/stack.py up installs Debian's prometheus"
    return subprocess.run([binary, *args], cwd=RULES, capture_output=True, text=True, check=False)


def test_the_rules_are_valid_and_pass_their_own_unit_tests() -> None:
    checked = promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    tested = promtool("test", "rules", "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_broken_expectation_fails_the_rule_tests(tmp_path: Path) -> None:
    """The rule tests can fail: an alert expected where none fires is reported."""
    broken = (
        (RULES / "rules_test.yml").read_text().replace("exp_alerts: []", "exp_alerts: [{exp_labels: {}}]", 1)
    )
    (tmp_path / "rules.yml").write_text((RULES / "rules.yml").read_text())
    (tmp_path / "rules_test.yml").write_text(broken)
    binary = shutil.which("promtool")
    assert binary
    result = subprocess.run(
        [binary, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def fast_rules(target: Path) -> Path:
    """rules.yml with DeadLettersAppearing over 20 s instead of 5 min (the loop's test)."""
    rules = (RULES / "rules.yml").read_text()
    fast, n = re.subn(
        r"increase\(cqrs_dead_letters_total\[5m\]\)", "increase(cqrs_dead_letters_total[20s])", rules
    )
    assert n == 1
    target.write_text(fast)
    return target


class Monitoring:
    """A Prometheus and an Alertmanager of this test, on free ports, with short intervals."""

    def __init__(self, workdir: Path, api_url: str, metrics_port: int) -> None:
        self.workdir = workdir
        self.prometheus_port, self.alertmanager_port = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        # every process of the side, as infra/stack.py renders the stack's own (a job per process)
        self.targets = {"api": urlparse(api_url).netloc, "projectors": f"127.0.0.1:{metrics_port}"}
        token_file = workdir / "token"
        token_file.write_text(token("operator", sub="alertmanager"))
        (workdir / "alertmanager.yml").write_text(
            (RULES.parent / "alertmanager" / "alertmanager.yml")
            .read_text()
            .format(
                group_wait="1s",
                group_interval="1s",
                webhook=f"{api_url}/api/v1/integrations/alertmanager",
                token_file=token_file,
            )
        )
        (workdir / "prometheus.yml").write_text(
            (RULES / "prometheus.yml")
            .read_text()
            .format(
                scrape_interval="1s",
                evaluation_interval="1s",
                rules=fast_rules(workdir / "rules.yml"),
                alertmanager=f"127.0.0.1:{self.alertmanager_port}",
                self=f"127.0.0.1:{self.prometheus_port}",
                targets="".join(
                    f"  - job_name: {job}\n    static_configs:\n      - targets: [{address!r}]\n"
                    for job, address in self.targets.items()
                ),
            )
        )

    def start(self) -> None:
        self._spawn(
            "alertmanager",
            "prometheus-alertmanager",
            f"--config.file={self.workdir / 'alertmanager.yml'}",
            f"--storage.path={self.workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
            "--cluster.listen-address=",
        )
        self._spawn(
            "prometheus",
            "prometheus",
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
        )

    def _spawn(self, name: str, *cmd: str) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(15)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=5) as c:
            try:
                r = await c.get(
                    f"http://127.0.0.1:{self.prometheus_port}/api/v1/query", params={"query": expr}
                )
            except httpx.TransportError:
                return []  # not listening yet
        if r.status_code == 503:  # starting: not ready to answer queries yet
            return []
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()["data"]["result"]
        return found


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("alerting"))
    await ws.start_serving()
    env = {**ws.env, "APP_METRICS_PORT": str(PROJECTORS_METRICS)}
    ws.start_projectors("datasets", "incidents", env=env)
    await ws.wait_until_projected()
    yield ws
    ws.stop()


@pytest.fixture(scope="module")
async def monitoring(side: WriteSide, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Monitoring]:
    m = Monitoring(tmp_path_factory.mktemp("monitoring"), side.api_url, PROJECTORS_METRICS)
    m.start()
    yield m
    m.stop()


async def test_prometheus_scrapes_every_process_and_finds_each_up(monitoring: Monitoring) -> None:
    async def every_target_up() -> dict[str, str] | None:
        async with httpx.AsyncClient(timeout=5) as c:
            try:
                r = await c.get(f"http://127.0.0.1:{monitoring.prometheus_port}/api/v1/targets")
            except httpx.TransportError:
                return None  # not listening yet
        if r.status_code != 200:
            return None
        health = {t["labels"]["job"]: t["health"] for t in r.json()["data"]["activeTargets"]}
        return health if set(health.values()) == {"up"} else None

    health = await until(every_target_up, 60, "Prometheus finding every target up")
    assert set(health) == {"prometheus", *monitoring.targets}


async def alert_incidents(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await client.get("/api/v1/incidents", params={"source": "alertmanager"})
    assert r.status_code == 200, r.text
    return [i for i in r.json()["items"] if i["title"].startswith("datasets is dead-lettering")]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_poison_event_fires_dead_letters_appearing_which_opens_one_incident_resolved_with_it(
    side: WriteSide, monitoring: Monitoring, client: httpx.AsyncClient
) -> None:
    async def scraped() -> bool:
        up = await monitoring.query('up{job="projectors"}')
        return bool(up) and up[0]["value"][1] == "1"

    await until(scraped, 60, "Prometheus scraping the projectors")
    assert await alert_incidents(client) == []

    producer = kafka.producer(side.settings)
    await producer.start()
    try:  # not an event of ours: the datasets projection dead-letters it
        await producer.send_and_wait(
            Topics(side.settings.topic_prefix).events("datasets"), b"\x00poison", key=b"x"
        )
    finally:
        await producer.stop()

    async def firing() -> list[dict[str, Any]]:
        return await monitoring.query('ALERTS{alertname="DeadLettersAppearing", alertstate="firing"}')

    alerts = await until(firing, 60, "DeadLettersAppearing firing")
    assert alerts[0]["metric"]["consumer"] == "datasets"

    async def opened() -> list[dict[str, Any]]:
        return await alert_incidents(client)

    [incident] = await until(opened, 60, "the incident Alertmanager opened")
    assert incident["status"] == "open"
    assert incident["priority"] == "medium"  # severity warning
    assert incident["external_id"]  # the alert's fingerprint

    async def resolved() -> list[dict[str, Any]]:
        found = await alert_incidents(client)
        return [i for i in found if i["status"] == "resolved"]

    [done] = await until(resolved, 120, "the incident resolved with the alert")
    assert done["id"] == incident["id"]
    assert len(await alert_incidents(client)) == 1
