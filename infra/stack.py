#!/usr/bin/env python3
"""Local stack without Docker: Kafka (KRaft), OpenSearch, PostgreSQL, Redis and Kafka Connect
with Debezium on 127.0.0.1.

Standard library only, so it runs before the project's virtualenv exists.

    python3 infra/stack.py up [SERVICE...]     idempotent; exits non-zero with the log tail on failure
    python3 infra/stack.py down [SERVICE...]   stops only what this stack started (pid files)
    python3 infra/stack.py status              one line per service; non-zero if any is down
    python3 infra/stack.py logs [SERVICE] [-n N]
    python3 infra/stack.py env                 prints the connection settings as shell exports
    python3 infra/stack.py up-apps | down-apps the application processes of infra/apps.toml
    python3 infra/stack.py urls                where everything listens

Downloads are cached (Kafka, Connect and Debezium jars and the OpenSearch zip in the local Maven repository,
unpacked runtimes under STACK_CACHE), so a second `up` on the same machine takes seconds.
Data and logs live under STACK_DIR (default: `.stack/` in the repository, git-ignored).
Every port, version and heap size can be overridden by the environment variable
named in `Config` below.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _default_cache() -> Path:
    # Services that refuse root (OpenSearch, PostgreSQL) must read the unpacked runtimes,
    # so a root user's cache lives in a world-readable system folder.
    if os.geteuid() == 0:
        return Path("/var/cache/kafka-cqrs-stack")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kafka-cqrs-stack"


@dataclass(frozen=True)
class Config:
    """Every knob of the stack, read from the environment with working defaults."""

    stack_dir: Path = field(default_factory=lambda: Path(_env("STACK_DIR", str(REPO / ".stack"))))
    cache_dir: Path = field(default_factory=lambda: Path(_env("STACK_CACHE", str(_default_cache()))))
    host: str = "127.0.0.1"
    kafka_version: str = field(default_factory=lambda: _env("KAFKA_VERSION", "3.9.1"))
    kafka_port: int = field(default_factory=lambda: int(_env("KAFKA_PORT", "9092")))
    kafka_controller_port: int = field(default_factory=lambda: int(_env("KAFKA_CONTROLLER_PORT", "9093")))
    kafka_heap: str = field(default_factory=lambda: _env("KAFKA_HEAP", "512m"))
    kafka_partitions: int = field(default_factory=lambda: int(_env("KAFKA_DEFAULT_PARTITIONS", "6")))
    opensearch_version: str = field(default_factory=lambda: _env("OPENSEARCH_VERSION", "2.19.3"))
    opensearch_port: int = field(default_factory=lambda: int(_env("OPENSEARCH_PORT", "9200")))
    opensearch_transport_port: int = field(
        default_factory=lambda: int(_env("OPENSEARCH_TRANSPORT_PORT", "9300"))
    )
    opensearch_heap: str = field(default_factory=lambda: _env("OPENSEARCH_HEAP", "512m"))
    opensearch_user: str = field(default_factory=lambda: _env("OPENSEARCH_USER", "opensearch"))
    postgres_version: str = field(default_factory=lambda: _env("POSTGRES_VERSION", "15"))
    postgres_port: int = field(default_factory=lambda: int(_env("POSTGRES_PORT", "5432")))
    postgres_user: str = field(default_factory=lambda: _env("POSTGRES_USER", "app"))
    postgres_password: str = field(default_factory=lambda: _env("POSTGRES_PASSWORD", "app"))
    postgres_db: str = field(default_factory=lambda: _env("POSTGRES_DB", "app"))
    redis_port: int = field(default_factory=lambda: int(_env("REDIS_PORT", "6379")))
    connect_version: str = field(default_factory=lambda: _env("CONNECT_VERSION", "4.3.0"))
    debezium_version: str = field(default_factory=lambda: _env("DEBEZIUM_VERSION", "3.6.1.Final"))
    connect_port: int = field(default_factory=lambda: int(_env("CONNECT_PORT", "8083")))
    connect_heap: str = field(default_factory=lambda: _env("CONNECT_HEAP", "512m"))
    connect_group: str = field(default_factory=lambda: _env("CONNECT_GROUP", "cqrs-connect"))
    prometheus_port: int = field(default_factory=lambda: int(_env("PROMETHEUS_PORT", "9090")))
    alertmanager_port: int = field(default_factory=lambda: int(_env("ALERTMANAGER_PORT", "9094")))
    scrape_interval: str = field(default_factory=lambda: _env("PROMETHEUS_SCRAPE_INTERVAL", "5s"))
    jaeger_version: str = field(default_factory=lambda: _env("JAEGER_VERSION", "v1.75.0"))
    jaeger_ui_port: int = field(default_factory=lambda: int(_env("JAEGER_UI_PORT", "16686")))
    otlp_grpc_port: int = field(default_factory=lambda: int(_env("OTLP_GRPC_PORT", "4317")))
    otlp_http_port: int = field(default_factory=lambda: int(_env("OTLP_HTTP_PORT", "4318")))
    jaeger_health_port: int = field(default_factory=lambda: int(_env("JAEGER_HEALTH_PORT", "13133")))
    zipkin_version: str = field(default_factory=lambda: _env("ZIPKIN_VERSION", "3.6.1"))
    zipkin_port: int = field(default_factory=lambda: int(_env("ZIPKIN_PORT", "9411")))
    zipkin_heap: str = field(default_factory=lambda: _env("ZIPKIN_HEAP", "384m"))
    # Zipkin keeps its traces in its heap: at most this many spans (about 1.5 kB each; 500k,
    # its default, ran 384 MB out of memory under S11's every-trace-sampled load)
    zipkin_max_spans: int = field(default_factory=lambda: int(_env("ZIPKIN_MAX_SPANS", "100000")))
    traces_topic: str = field(default_factory=lambda: _env("TRACES_TOPIC", "cqrs-traces.zipkin"))
    trace_sample_ratio: str = field(default_factory=lambda: _env("TRACE_SAMPLE_RATIO", "0.1"))
    legacy_db: str = field(default_factory=lambda: _env("LEGACY_DB", "legacy"))
    legacy_user: str = field(default_factory=lambda: _env("LEGACY_USER", "legacy"))
    legacy_password: str = field(default_factory=lambda: _env("LEGACY_PASSWORD", "legacy"))
    start_timeout: float = field(default_factory=lambda: float(_env("STACK_START_TIMEOUT", "180")))


class StackError(RuntimeError):
    """A service could not be installed or started; the message says what to look at."""


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        data = f.read().decode("utf-8", "replace").splitlines()
    return "\n".join(data[-lines:])


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, marker: str) -> bool:
    """True when pid runs and its command line mentions `marker` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def process_exists(pid: int) -> bool:
    """True while pid exists and is not a zombie, whatever its command line says.

    A starting JVM's /proc/<pid>/cmdline can read empty for a moment, so `pid_alive`
    may say no for a process that is fine; start-up checks use this instead.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        log(f"creating system user {name}")
        run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])


def make_traversable(path: Path) -> None:
    """Let unprivileged service users reach `path`: add o+x to ancestors that lack it.

    A fresh clone made with `mktemp -d` sits below a 0700 folder; PostgreSQL and
    OpenSearch refuse to run as root, so their users must be able to enter it.
    """
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
        except OSError:
            continue
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise StackError(f"missing {' '.join(packages)}: install them (apt-get install) or run as root")
    log(f"installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Keep package scripts from starting the distribution's own instances on our ports.
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = not policy.exists()
    if created_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)


def wait_until(check: object, timeout: float, what: str, proc_alive: object = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        if proc_alive is not None and not proc_alive():  # type: ignore[operator]
            raise StackError(f"{what} exited during start-up")
        time.sleep(0.25)
    raise StackError(f"{what} not ready after {timeout:.0f}s")


def terminate(pid: int, marker: str, timeout: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, marker):
            return
        time.sleep(0.2)
    log(f"pid {pid} did not stop in {timeout:.0f}s; killing it")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def spawn(cmd: list[str], logfile: Path, pidfile: Path, env: dict[str, str] | None = None) -> int:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # survives the shell that ran `up`
        )
    pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


# --------------------------------------------------------------------------- services


class Service:
    """One managed process: install, start, health check, stop."""

    name = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.home = cfg.stack_dir / self.name
        self.pidfile = self.home / f"{self.name}.pid"
        self.logfile = self.home / f"{self.name}.log"

    # The text that must appear in the process command line for the pid to be ours.
    @property
    def marker(self) -> str:
        return str(self.home)

    @property
    def port(self) -> int:
        raise NotImplementedError

    def install(self) -> None: ...

    def start(self) -> None:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def running_pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        return pid if pid is not None and pid_alive(pid, self.marker) else None

    def _alive_while_starting(self) -> bool:
        if self.running_pid() is not None:
            return True
        pid = read_pid(self.pidfile)
        return pid is not None and process_exists(pid)

    def stop(self) -> None:
        pid = self.running_pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return
        log(f"stopping {self.name} (pid {pid})")
        terminate(pid, self.marker)
        self.pidfile.unlink(missing_ok=True)

    def url(self) -> str:
        raise NotImplementedError

    def up(self) -> None:
        if self.running_pid() is not None:
            if self.healthy():
                log(f"{self.name} already running at {self.url()}")
                return
        elif port_open(self.cfg.host, self.port):
            raise StackError(
                f"port {self.port} is taken by a process this stack did not start; stop it "
                f"or choose another port ({self.name.upper()}_PORT)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        self.install()
        if self.running_pid() is None:
            log(f"starting {self.name}")
            t0 = time.monotonic()
            try:
                self.start()
                wait_until(
                    self.healthy,
                    self.cfg.start_timeout,
                    self.name,
                    proc_alive=self._alive_while_starting,
                )
            except (StackError, subprocess.CalledProcessError) as exc:
                raise StackError(
                    f"{self.name} failed to start: {exc}\n--- {self.logfile} ---\n{tail(self.logfile)}"
                ) from exc
            log(f"{self.name} ready at {self.url()} in {time.monotonic() - t0:.1f}s")
        else:
            wait_until(self.healthy, self.cfg.start_timeout, self.name)


class Redis(Service):
    name = "redis"

    @property
    def port(self) -> int:
        return self.cfg.redis_port

    def url(self) -> str:
        return f"redis://{self.cfg.host}:{self.port}/0"

    def install(self) -> None:
        if shutil.which("redis-server") is None:
            apt_install("redis-server")

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                self.cfg.host,
                "--port",
                str(self.port),
                "--dir",
                str(self.home),
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.logfile),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
        )
        wait_until(self.pidfile.exists, 10, "redis pid file")

    @property
    def marker(self) -> str:
        return f":{self.port}"

    def healthy(self) -> bool:
        try:
            with socket.create_connection((self.cfg.host, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class Postgres(Service):
    name = "postgres"

    @property
    def port(self) -> int:
        return self.cfg.postgres_port

    @property
    def bindir(self) -> Path:
        return Path(f"/usr/lib/postgresql/{self.cfg.postgres_version}/bin")

    @property
    def data(self) -> Path:
        return self.home / "data"

    def url(self) -> str:
        c = self.cfg
        return f"postgresql://{c.postgres_user}:{c.postgres_password}@{c.host}:{self.port}/{c.postgres_db}"

    def _as_postgres(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True)

    def install(self) -> None:
        if not (self.bindir / "postgres").exists():
            apt_install(f"postgresql-{self.cfg.postgres_version}")
        ensure_user("postgres")
        make_traversable(self.home)
        shutil.chown(self.home, "postgres", "postgres")
        if (self.data / "PG_VERSION").exists():
            return
        log("initialising the PostgreSQL cluster")
        pwfile = self.home / ".pw"
        pwfile.write_text(self.cfg.postgres_password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._as_postgres(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(
                "\n# kafka-cqrs local stack\n"
                f"listen_addresses = '{self.cfg.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.home}'\n"
                "wal_level = logical\n"
                "max_connections = 200\n"
                "shared_buffers = 256MB\n"
                "max_wal_size = 2GB\n"
            )
        self._start_pg()
        self._bootstrap_role()

    def _start_pg(self) -> None:
        self._as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "start",
        )

    def _bootstrap_role(self) -> None:
        c = self.cfg
        psql = [
            str(self.bindir / "psql"),
            "-h",
            str(self.home),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
        ]
        pw = c.postgres_password.replace("'", "''")
        self._as_postgres(*psql, "-c", f"CREATE ROLE \"{c.postgres_user}\" LOGIN CREATEDB PASSWORD '{pw}'")
        self._as_postgres(*psql, "-c", f'CREATE DATABASE "{c.postgres_db}" OWNER "{c.postgres_user}"')
        # Logical replication (the CDC job) needs this attribute on the role.
        self._as_postgres(*psql, "-c", f'ALTER ROLE "{c.postgres_user}" REPLICATION')

    def start(self) -> None:
        if self.running_pid() is None:
            self._start_pg()

    def up(self) -> None:
        super().up()
        self._ensure_legacy()

    def _psql(self, *args: str, db: str = "postgres") -> subprocess.CompletedProcess[str]:
        return self._as_postgres(
            str(self.bindir / "psql"),
            "-h",
            str(self.home),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-tAq",
            *args,
        )

    def _ensure_legacy(self) -> None:
        """The source database of the CDC job: `legacy`, owned by a role of its own (that
        may replicate: Debezium reads its changes as it), with `catalog.datasets`."""
        c = self.cfg
        if self._psql("-c", f"SELECT 1 FROM pg_database WHERE datname = '{c.legacy_db}'").stdout.strip():
            return
        log(f"creating the legacy catalogue (database {c.legacy_db}, role {c.legacy_user})")
        pw = c.legacy_password.replace("'", "''")
        exists = self._psql("-c", f"SELECT 1 FROM pg_roles WHERE rolname = '{c.legacy_user}'").stdout.strip()
        verb = "ALTER" if exists else "CREATE"
        self._psql("-c", f"{verb} ROLE \"{c.legacy_user}\" LOGIN REPLICATION PASSWORD '{pw}'")
        self._psql("-c", f'CREATE DATABASE "{c.legacy_db}" OWNER "{c.legacy_user}"')
        sql = (INFRA / "legacy" / "catalog.sql").read_text()
        self._psql("-c", f'SET ROLE "{c.legacy_user}";\n{sql}', db=c.legacy_db)

    def legacy_url(self) -> str:
        c = self.cfg
        return f"postgresql://{c.legacy_user}:{c.legacy_password}@{c.host}:{self.port}/{c.legacy_db}"

    def running_pid(self) -> int | None:
        pid = read_pid(self.data / "postmaster.pid")
        return pid if pid is not None and pid_alive(pid, str(self.data)) else None

    def stop(self) -> None:
        if self.running_pid() is None:
            return
        log("stopping postgres")
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def healthy(self) -> bool:
        isready = self.bindir / "pg_isready"
        res = subprocess.run(
            [
                str(isready),
                "-q",
                "-h",
                self.cfg.host,
                "-p",
                str(self.port),
                "-d",
                self.cfg.postgres_db,
                "-U",
                self.cfg.postgres_user,
            ],
            check=False,
        )
        return res.returncode == 0


class Kafka(Service):
    name = "kafka"

    @property
    def port(self) -> int:
        return self.cfg.kafka_port

    @property
    def libs(self) -> Path:
        return self.cfg.cache_dir / f"kafka-{self.cfg.kafka_version}" / "libs"

    def url(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def install(self) -> None:
        if not (self.libs / ".complete").exists():
            if shutil.which("mvn") is None:
                apt_install("maven")
            log(f"resolving Kafka {self.cfg.kafka_version} jars from Maven Central")
            tmp = self.libs.with_name("libs.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            run(
                [
                    "mvn",
                    "-q",
                    "-B",
                    "-f",
                    str(INFRA / "kafka" / "pom.xml"),
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-Dkafka.version={self.cfg.kafka_version}",
                    f"-DoutputDirectory={tmp}",
                ]
            )
            shutil.rmtree(self.libs, ignore_errors=True)
            tmp.rename(self.libs)
            (self.libs / ".complete").touch()
        c = self.cfg
        data = self.home / "data"
        props = self.home / "server.properties"
        props.write_text(
            (INFRA / "kafka" / "server.properties")
            .read_text()
            .format(
                host=c.host,
                port=c.kafka_port,
                controller_port=c.kafka_controller_port,
                data=data,
                partitions=c.kafka_partitions,
            )
        )
        (self.home / "log4j.properties").write_text(
            (INFRA / "kafka" / "log4j.properties").read_text().format(logdir=self.home)
        )
        if not (data / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            log(f"formatting KRaft storage (cluster {cluster_id})")
            run(
                [*self._java(), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                capture_output=True,
            )

    def _java(self) -> list[str]:
        return [
            "java",
            f"-Xms{min(256, _mb(self.cfg.kafka_heap))}m",
            f"-Xmx{self.cfg.kafka_heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.home}",
            "-cp",
            f"{self.libs}/*",
        ]

    def start(self) -> None:
        spawn(
            [*self._java(), "kafka.Kafka", str(self.home / "server.properties")], self.logfile, self.pidfile
        )

    def healthy(self) -> bool:
        return kafka_api_versions(self.cfg.host, self.port)


class OpenSearch(Service):
    name = "opensearch"

    @property
    def port(self) -> int:
        return self.cfg.opensearch_port

    @property
    def dist(self) -> Path:
        return self.cfg.cache_dir / f"opensearch-{self.cfg.opensearch_version}"

    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def install(self) -> None:
        v = self.cfg.opensearch_version
        if not (self.dist / ".complete").exists():
            artifact = f"org.opensearch.distribution.integ-test-zip:opensearch:{v}:zip"
            repo = Path.home() / ".m2" / "repository"
            zpath = repo / f"org/opensearch/distribution/integ-test-zip/opensearch/{v}/opensearch-{v}.zip"
            if not zpath.exists():
                if shutil.which("mvn") is None:
                    apt_install("maven")
                log(f"downloading OpenSearch {v} from Maven Central")
                run(["mvn", "-q", "-B", "dependency:get", f"-Dartifact={artifact}", "-Dtransitive=false"])
            log(f"unpacking OpenSearch {v}")
            tmp = self.dist.with_name(self.dist.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _unzip(zpath, tmp)
            inner = next(tmp.iterdir())  # the zip holds one top folder, opensearch-<v>
            shutil.rmtree(self.dist, ignore_errors=True)
            inner.rename(self.dist)
            shutil.rmtree(tmp, ignore_errors=True)
            (self.dist / ".complete").touch()
        ensure_user(self.cfg.opensearch_user)
        make_traversable(self.dist)
        make_traversable(self.home)
        conf = self.home / "config"
        if not conf.exists():
            shutil.copytree(self.dist / "config", conf)
        # The launcher runs from the (read-only, shared) distribution folder: point the
        # JVM's relative log paths at our own logs folder, and set the heap here.
        opts = (self.dist / "config" / "jvm.options").read_text()
        opts = opts.replace("logs/", f"{self.home / 'logs'}/")
        opts = opts.replace("-Xms1g", f"-Xms{self.cfg.opensearch_heap}").replace(
            "-Xmx1g", f"-Xmx{self.cfg.opensearch_heap}"
        )
        (conf / "jvm.options").write_text(opts)
        for sub in ("data", "logs"):
            (self.home / sub).mkdir(exist_ok=True)
        for p in [self.home, *self.home.rglob("*")]:
            shutil.chown(p, self.cfg.opensearch_user, self.cfg.opensearch_user)

    def start(self) -> None:
        c = self.cfg
        java_home = Path(os.path.realpath(shutil.which("java") or "/usr/bin/java")).parent.parent
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "OPENSEARCH_JAVA_HOME": str(java_home),
            "JAVA_HOME": str(java_home),
            "OPENSEARCH_PATH_CONF": str(self.home / "config"),
        }
        self.pidfile.unlink(missing_ok=True)
        cmd = [
            "runuser",
            "-u",
            c.opensearch_user,
            "--",
            "env",
            *[f"{k}={v}" for k, v in env.items()],
            str(self.dist / "bin" / "opensearch"),
            "-d",
            "-p",
            str(self.pidfile),
            "-Ediscovery.type=single-node",
            f"-Enetwork.host={c.host}",
            f"-Ehttp.port={c.opensearch_port}",
            f"-Etransport.port={c.opensearch_transport_port}",
            f"-Epath.data={self.home / 'data'}",
            f"-Epath.logs={self.home / 'logs'}",
            "-Ecluster.routing.allocation.disk.threshold_enabled=false",
            "-Eaction.auto_create_index=false",
        ]
        with self.logfile.open("ab") as out:
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self.pidfile.exists, 60, "opensearch pid file")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url()}/_cluster/health", timeout=2) as resp:
                return bool(json.load(resp).get("status") in ("green", "yellow"))
        except (OSError, urllib.error.URLError, ValueError):
            return False

    @property
    def logs_hint(self) -> Path:
        return self.home / "logs" / "opensearch.log"


class Connect(Service):
    """A Kafka Connect worker in distributed mode with Debezium's PostgreSQL connector."""

    name = "connect"

    @property
    def port(self) -> int:
        return self.cfg.connect_port

    @property
    def dist(self) -> Path:
        return self.cfg.cache_dir / f"connect-{self.cfg.connect_version}"

    @property
    def plugin(self) -> Path:
        return self.dist / "plugins" / f"debezium-postgres-{self.cfg.debezium_version}"

    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def _resolve(self, pom: str, dest: Path, *props: str) -> None:
        if (dest / ".complete").exists():
            return
        if shutil.which("mvn") is None:
            apt_install("maven")
        log(f"resolving {dest.name} from Maven Central")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(INFRA / "connect" / pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp}",
                *props,
            ]
        )
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        (dest / ".complete").touch()

    def install(self) -> None:
        c = self.cfg
        self.dist.mkdir(parents=True, exist_ok=True)
        self._resolve("pom.xml", self.dist / "libs", f"-Dconnect.version={c.connect_version}")
        self.plugin.parent.mkdir(parents=True, exist_ok=True)
        # the worker provides Kafka's own jars, slf4j and Jackson: a plugin copy of them would be
        # other classes of the same names (Debezium's converters reflect on the worker's)
        self._resolve(
            "debezium.xml",
            self.plugin,
            f"-Ddebezium.version={c.debezium_version}",
            "-DexcludeGroupIds=org.apache.kafka,org.slf4j,com.fasterxml.jackson.core",
        )
        for other in self.plugin.parent.iterdir():
            if other != self.plugin:  # one Debezium version on the plugin path
                shutil.rmtree(other, ignore_errors=True)
        (self.home / "worker.properties").write_text(
            (INFRA / "connect" / "worker.properties")
            .read_text()
            .format(
                bootstrap=f"{c.host}:{c.kafka_port}",
                group=c.connect_group,
                host=c.host,
                port=self.port,
                plugins=self.plugin.parent,
            )
        )
        (self.home / "log4j2.properties").write_text(
            (INFRA / "connect" / "log4j2.properties").read_text().format(logdir=self.home)
        )

    def start(self) -> None:
        spawn(
            [
                "java",
                f"-Xms{min(256, _mb(self.cfg.connect_heap))}m",
                f"-Xmx{self.cfg.connect_heap}",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp",
                f"{self.dist / 'libs'}/*",
                "org.apache.kafka.connect.cli.ConnectDistributed",
                str(self.home / "worker.properties"),
            ],
            self.home / "connect.out",
            self.pidfile,
        )

    def healthy(self) -> bool:
        """The REST API serves its resources (before that Jetty answers 404) and the worker
        has joined its group: the connector plugins it lists include Debezium's."""
        try:
            with urllib.request.urlopen(f"{self.url()}/connector-plugins", timeout=2) as resp:
                plugins = json.load(resp)
            with urllib.request.urlopen(f"{self.url()}/connectors", timeout=2) as resp:
                json.load(resp)
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return any(p.get("class", "").endswith("PostgresConnector") for p in plugins)


def _debian_monitoring() -> None:
    """Prometheus, promtool and Alertmanager from Debian's packages, when missing."""
    missing = [pkg for pkg in ("prometheus", "prometheus-alertmanager") if shutil.which(pkg) is None]
    if missing:
        apt_install(*missing)


def _debian_browser() -> None:
    """Debian's chromium, which the console's browser test drives (Playwright), when missing."""
    if shutil.which("chromium") is None:
        apt_install("chromium")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class Prometheus(Service):
    """Debian's Prometheus, scraping every process of infra/apps.toml, with the project's rules."""

    name = "prometheus"

    @property
    def port(self) -> int:
        return self.cfg.prometheus_port

    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def install(self) -> None:
        _debian_monitoring()
        c = self.cfg
        targets = []
        for app in apps(c):
            port = app.spec.get("metrics")
            if port:
                targets.append(
                    f'  - job_name: {app.name}\n    static_configs:\n      - targets: ["{c.host}:{port}"]\n'
                )
        (self.home / "prometheus.yml").write_text(
            (INFRA / "prometheus" / "prometheus.yml")
            .read_text()
            .format(
                scrape_interval=c.scrape_interval,
                evaluation_interval=c.scrape_interval,
                rules=INFRA / "prometheus" / "rules.yml",
                alertmanager=f"{c.host}:{c.alertmanager_port}",
                self=f"{c.host}:{self.port}",
                targets="".join(targets),
            )
        )
        (self.home / "data").mkdir(exist_ok=True)

    def start(self) -> None:
        spawn(
            [
                "prometheus",
                f"--config.file={self.home / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.home / 'data'}",
                "--storage.tsdb.retention.time=7d",
                f"--web.listen-address={self.cfg.host}:{self.port}",
                "--web.enable-lifecycle",
            ],
            self.logfile,
            self.pidfile,
        )

    def healthy(self) -> bool:
        return _http_ok(f"{self.url()}/-/ready")


class Alertmanager(Service):
    """Debian's Alertmanager, routing the service's own alerts to its incidents context."""

    name = "alertmanager"

    @property
    def port(self) -> int:
        return self.cfg.alertmanager_port

    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    @property
    def token_file(self) -> Path:
        """Where `make up` writes the token Alertmanager calls the API with."""
        return self.home / "token"

    def install(self) -> None:
        _debian_monitoring()
        api = next((a for a in apps(self.cfg) if a.name == "api"), None)
        api_port = api.port if api is not None else 8000
        if not self.token_file.exists():
            self.token_file.write_text("")
        (self.home / "alertmanager.yml").write_text(
            (INFRA / "alertmanager" / "alertmanager.yml")
            .read_text()
            .format(
                group_wait="10s",
                group_interval="1m",
                webhook=f"http://{self.cfg.host}:{api_port}/api/v1/integrations/alertmanager",
                token_file=self.token_file,
            )
        )
        (self.home / "data").mkdir(exist_ok=True)

    def start(self) -> None:
        spawn(
            [
                "prometheus-alertmanager",
                f"--config.file={self.home / 'alertmanager.yml'}",
                f"--storage.path={self.home / 'data'}",
                f"--web.listen-address={self.cfg.host}:{self.port}",
                "--cluster.listen-address=",  # one instance: no gossip port
            ],
            self.logfile,
            self.pidfile,
        )

    def healthy(self) -> bool:
        return _http_ok(f"{self.url()}/-/ready")


class Jaeger(Service):
    """Jaeger v2 (all in one, traces in memory), built from the Go module proxy: the OTLP
    receiver the processes export their traces to, the query API that reads them, and the
    collector that hands every span on to Zipkin's topic (Jaeger's own UI is not in the module)."""

    name = "jaeger"

    @property
    def port(self) -> int:
        return self.cfg.otlp_http_port

    @property
    def binary(self) -> Path:
        return self.cfg.cache_dir / f"jaeger-{self.cfg.jaeger_version}" / "jaeger"

    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.jaeger_ui_port}"

    def install(self) -> None:
        if not self.binary.exists():
            if shutil.which("go") is None:
                raise StackError("Go is missing: the trace backend (Jaeger) is built with it (go.dev/dl)")
            log(f"building Jaeger {self.cfg.jaeger_version} from the Go module proxy (first time: minutes)")
            self.binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.binary.with_name("jaeger.tmp")
            run(
                ["go", "build", "-o", str(tmp), "github.com/jaegertracing/jaeger/cmd/jaeger"],
                cwd=str(INFRA / "jaeger"),
            )
            tmp.rename(self.binary)
        c = self.cfg
        (self.home / "config.yaml").write_text(
            (INFRA / "jaeger" / "config.yaml")
            .read_text()
            .format(
                health=f"{c.host}:{c.jaeger_health_port}",
                ui=f"{c.host}:{c.jaeger_ui_port}",
                query_grpc=f"{c.host}:{c.jaeger_ui_port - 1}",
                otlp_grpc=f"{c.host}:{c.otlp_grpc_port}",
                otlp_http=f"{c.host}:{c.otlp_http_port}",
                kafka=f"{c.host}:{c.kafka_port}",
                topic=c.traces_topic,
            )
        )

    def start(self) -> None:
        spawn([str(self.binary), f"--config=file:{self.home / 'config.yaml'}"], self.logfile, self.pidfile)

    def healthy(self) -> bool:
        return _http_ok(f"http://{self.cfg.host}:{self.cfg.jaeger_health_port}/status")


class Zipkin(Service):
    """Zipkin's server from Maven Central, traces in memory: the trace UI a person opens. It
    collects the spans Jaeger hands on to a Kafka topic, so the processes export OTLP once."""

    name = "zipkin"

    @property
    def port(self) -> int:
        return self.cfg.zipkin_port

    @property
    def jar(self) -> Path:
        v = self.cfg.zipkin_version
        return self.cfg.cache_dir / f"zipkin-{v}" / f"zipkin-server-{v}-exec.jar"

    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/zipkin/"

    def install(self) -> None:
        if self.jar.exists():
            return
        if shutil.which("mvn") is None:
            apt_install("maven")
        log(f"downloading Zipkin {self.cfg.zipkin_version} from Maven Central")
        tmp = self.jar.parent.with_name(self.jar.parent.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run(
            [
                "mvn",
                "-q",
                "-B",
                "dependency:copy",
                f"-Dartifact=io.zipkin:zipkin-server:{self.cfg.zipkin_version}:jar:exec",
                f"-DoutputDirectory={tmp}",
            ],
            cwd=str(self.cfg.cache_dir),
        )
        shutil.rmtree(self.jar.parent, ignore_errors=True)
        tmp.rename(self.jar.parent)

    def start(self) -> None:
        c = self.cfg
        env = {
            **os.environ,
            "STORAGE_TYPE": "mem",
            "MEM_MAX_SPANS": str(c.zipkin_max_spans),
            "KAFKA_BOOTSTRAP_SERVERS": f"{c.host}:{c.kafka_port}",
            "KAFKA_TOPIC": c.traces_topic,
            "KAFKA_GROUP_ID": "cqrs-traces-zipkin",
            "COLLECTOR_SCRIBE_ENABLED": "false",
        }
        spawn(
            [
                "java",
                f"-Xms{min(128, _mb(c.zipkin_heap))}m",
                f"-Xmx{c.zipkin_heap}",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-XX:+ExitOnOutOfMemoryError",  # dead and seen by `make status`, not half alive
                f"-Djava.io.tmpdir={self.home}",  # also the marker that the pid is ours
                "-jar",
                str(self.jar),
                f"--armeria.ports[0].ip={c.host}",
                f"--armeria.ports[0].port={self.port}",
                "--armeria.ports[0].protocols=http",
            ],
            self.logfile,
            self.pidfile,
            env=env,
        )

    def healthy(self) -> bool:
        return _http_ok(f"http://{self.cfg.host}:{self.port}/health")


def _mb(size: str) -> int:
    s = size.lower()
    n = int(s.rstrip("mg"))
    return n * 1024 if s.endswith("g") else n


def _unzip(zpath: Path, dest: Path) -> None:
    with zipfile.ZipFile(zpath) as z:
        for info in z.infolist():
            target = Path(z.extract(info, dest))
            mode = info.external_attr >> 16
            if mode:
                target.chmod(mode & 0o7777)


def kafka_api_versions(host: str, port: int) -> bool:
    """Ask the broker for its API versions over the wire: it answers once it serves clients."""
    request = struct.pack(">hhih", 18, 0, 1, 5) + b"stack"  # ApiVersions v0, correlation 1, client "stack"
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(struct.pack(">i", len(request)) + request)
            header = _recv_exact(s, 4)
            (size,) = struct.unpack(">i", header)
            body = _recv_exact(s, size)
    except OSError:
        return False
    correlation, error = struct.unpack(">ih", body[:6])
    return bool(correlation == 1 and error == 0)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


class App(Service):
    """An application process of `infra/apps.toml`, run from the project's virtualenv."""

    def __init__(self, cfg: Config, name: str, spec: dict[str, object]) -> None:
        self.name = name
        self.spec = spec
        super().__init__(cfg)
        self.home = cfg.stack_dir / "apps"
        self.pidfile = self.home / f"{name}.pid"
        self.logfile = self.home / f"{name}.log"

    @property
    def marker(self) -> str:
        return str(self.spec["command"][-1])  # type: ignore[index]

    @property
    def port(self) -> int:
        return int(str(self.spec.get("port", 0)))

    def url(self) -> str:
        return str(self.spec.get("url", "-"))

    def start(self) -> None:
        venv_bin = REPO / ".venv" / "bin"
        command = [str(c) for c in self.spec["command"]]  # type: ignore[attr-defined]
        command[0] = str(venv_bin / command[0])
        env = {**os.environ, **connection_env(self.cfg), "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
        if self.spec.get("metrics") and self.spec.get("metrics") != self.spec.get("port"):
            env["APP_METRICS_PORT"] = str(self.spec["metrics"])  # the API serves its own
        pid = spawn(command, self.logfile, self.pidfile, env=env)
        # Until the child has exec'd, its command line is still ours: wait for that.
        wait_until(
            lambda: pid_alive(pid, self.marker) or not Path(f"/proc/{pid}").exists(), 15, f"{self.name} exec"
        )

    def healthy(self) -> bool:
        health = self.spec.get("health")
        if not health:
            return self.running_pid() is not None
        try:
            with urllib.request.urlopen(str(health), timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def up(self) -> None:
        if not (REPO / ".venv" / "bin" / str(self.spec["command"][0])).exists():  # type: ignore[index]
            raise StackError("the virtualenv is missing: run `make up` (it installs the project first)")
        if self.port and self.running_pid() is None and port_open(self.cfg.host, self.port):
            raise StackError(
                f"port {self.port} for {self.name} is taken by a process this stack did not start"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        if self.running_pid() is None:
            log(f"starting {self.name}")
            self.start()
        try:
            wait_until(
                self.healthy,
                self.cfg.start_timeout,
                self.name,
                proc_alive=lambda: self.running_pid() is not None,
            )
        except StackError as exc:
            raise StackError(f"{exc}\n--- {self.logfile} ---\n{tail(self.logfile)}") from exc
        log(f"{self.name} running ({self.url()})")


def apps(cfg: Config) -> list[App]:
    spec = tomllib.loads((INFRA / "apps.toml").read_text())
    return [App(cfg, name, entry) for name, entry in spec.items()]


SERVICES: dict[str, type[Service]] = {
    # Start order: the light ones first, then one JVM at a time (CPU is the constraint).
    "redis": Redis,
    "postgres": Postgres,
    "kafka": Kafka,
    "opensearch": OpenSearch,
    "connect": Connect,
    "prometheus": Prometheus,
    "alertmanager": Alertmanager,
    "jaeger": Jaeger,
    "zipkin": Zipkin,
}


def services(cfg: Config, names: list[str]) -> list[Service]:
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise StackError(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    return [SERVICES[n](cfg) for n in (names or list(SERVICES))]


def connection_env(cfg: Config) -> dict[str, str]:
    """The settings the application reads, pointing at this stack."""
    c = cfg
    return {
        "APP_KAFKA_BOOTSTRAP": f"{c.host}:{c.kafka_port}",
        "APP_POSTGRES_DSN": Postgres(c).url(),
        "APP_OPENSEARCH_URL": f"http://{c.host}:{c.opensearch_port}",
        "APP_REDIS_URL": f"redis://{c.host}:{c.redis_port}/0",
        "APP_CDC_CONNECT_URL": Connect(c).url(),
        "APP_CDC_SOURCE_DSN": Postgres(c).legacy_url(),
        # traces to the stack's Jaeger; a caller's sampled trace is always followed
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{c.host}:{c.otlp_http_port}",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": c.trace_sample_ratio,
    }


# --------------------------------------------------------------------------- commands


def cmd_up(cfg: Config, names: list[str]) -> int:
    cfg.stack_dir.mkdir(parents=True, exist_ok=True)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for svc in services(cfg, names):
        svc.up()
    if not names:
        _debian_browser()
    log(f"stack up in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_down(cfg: Config, names: list[str]) -> int:
    for svc in reversed(services(cfg, names)):
        svc.stop()
    return 0


def cmd_status(cfg: Config, names: list[str], as_json: bool = False) -> int:
    rows = []
    for svc in [*services(cfg, names), *(apps(cfg) if not names else [])]:
        pid = svc.running_pid()
        healthy = pid is not None and svc.healthy()
        rows.append({"service": svc.name, "pid": pid, "healthy": healthy, "url": svc.url()})
    if as_json:
        print(json.dumps(rows))
    else:
        for r in rows:
            state = "healthy" if r["healthy"] else ("unhealthy" if r["pid"] else "down")
            print(f"{r['service']:<11} {state:<10} pid={r['pid'] or '-':<8} {r['url']}")
    # Application processes are optional (`make up` starts them, tests do not).
    required = [r for r in rows if r["service"] in SERVICES or r["pid"]]
    return 0 if all(r["healthy"] for r in required) else 1


def cmd_up_apps(cfg: Config) -> int:
    for app in apps(cfg):
        app.up()
    return 0


def cmd_down_apps(cfg: Config) -> int:
    for app in reversed(apps(cfg)):
        app.stop()
    return 0


def cmd_urls(cfg: Config) -> int:
    for svc in [*services(cfg, []), *apps(cfg)]:
        print(f"  {svc.name:<20} {svc.url()}")
    print(f"  {'trace UI':<20} {Zipkin(cfg).url()}traces/<trace id>")
    print(f"  {'trace query API':<20} {Jaeger(cfg).url()}/api/traces/<trace id>")
    for app in apps(cfg):
        if app.spec.get("metrics"):
            print(f"  {app.name + ' metrics':<20} http://{cfg.host}:{app.spec['metrics']}/metrics")
    return 0


def cmd_logs(cfg: Config, names: list[str], lines: int) -> int:
    chosen = services(cfg, [n for n in names if n in SERVICES]) if names else services(cfg, [])
    chosen += [a for a in apps(cfg) if not names or a.name in names]
    for svc in chosen:
        path = svc.logs_hint if isinstance(svc, OpenSearch) else svc.logfile
        print(f"==> {svc.name}: {path} <==")
        print(tail(path, lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status", "logs"):
        p = sub.add_parser(name)
        p.add_argument("services", nargs="*")
        if name == "logs":
            p.add_argument("-n", type=int, default=40)
        if name == "status":
            p.add_argument("--json", action="store_true")
    for name in ("env", "up-apps", "down-apps", "urls"):
        sub.add_parser(name)
    args = parser.parse_args(argv)
    cfg = Config()
    try:
        if args.command == "up":
            return cmd_up(cfg, args.services)
        if args.command == "down":
            return cmd_down(cfg, args.services)
        if args.command == "status":
            return cmd_status(cfg, args.services, args.json)
        if args.command == "logs":
            return cmd_logs(cfg, args.services, args.n)
        if args.command == "up-apps":
            return cmd_up_apps(cfg)
        if args.command == "down-apps":
            return cmd_down_apps(cfg)
        if args.command == "urls":
            return cmd_urls(cfg)
        for k, v in connection_env(cfg).items():
            print(f"export {k}={v}")
        return 0
    except StackError as exc:
        print(f"[stack] error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
