"""S1's HTTP peer: what a Python team would build instead of this product.

The `eventsourcing` library's Application on PostgreSQL, running the same `Dataset`
aggregate, behind FastAPI routes shaped like ours (the same paths and bodies, JSON
answers with the new version), served by uvicorn in a process of its own and driven by
the same HTTP client as ours. Its route handlers are plain `def`s, as the library's
blocking API calls for: FastAPI runs them in its thread pool. Optimistic concurrency is
the library's (a conflicting save raises; answered 409).

Run as `uvicorn bench.peer_http:create_app --factory`; the library reads its
persistence settings from the environment (`bench.common.peer_environment`), and
`PEER_APP_NAME` names its tables.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError
from fastapi import Body, FastAPI, HTTPException

from commands.datasets.aggregate import Dataset


class DatasetService(Application[uuid.UUID]):
    """One method per command, as the library's users write them."""

    def register(self, dataset_id: uuid.UUID, args: dict[str, Any]) -> int:
        dataset = Dataset.register(dataset_id, **args)
        self.save(dataset)
        return int(dataset.version)

    def handle(self, dataset_id: uuid.UUID, kind: str, args: dict[str, Any]) -> int:
        dataset: Dataset = self.repository.get(dataset_id)
        getattr(dataset, kind)(**args)
        self.save(dataset)
        return int(dataset.version)


def create_app() -> FastAPI:
    DatasetService.name = os.environ.get("PEER_APP_NAME", "benchpeer")
    service = DatasetService(env=dict(os.environ))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="eventsourcing peer", lifespan=lifespan)

    def command(dataset_id: uuid.UUID, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            version = service.handle(dataset_id, kind, args)
        except IntegrityError as exc:
            raise HTTPException(409, "version conflict") from exc
        return {"id": str(dataset_id), "version": version}

    @app.post("/api/v1/datasets", status_code=201)
    def register(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        dataset_id = uuid.uuid4()
        return {"id": str(dataset_id), "version": service.register(dataset_id, body)}

    @app.put("/api/v1/datasets/{dataset_id}/metadata/{key}")
    def set_metadata(dataset_id: uuid.UUID, key: str, body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return command(dataset_id, "set_metadata", {"key": key, "value": body["value"]})

    @app.post("/api/v1/datasets/{dataset_id}/versions")
    def publish_version(dataset_id: uuid.UUID, body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return command(dataset_id, "publish_version", body)

    @app.post("/api/v1/datasets/{dataset_id}/quality-checks")
    def record_quality_check(dataset_id: uuid.UUID, body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return command(dataset_id, "record_quality_check", body)

    @app.patch("/api/v1/datasets/{dataset_id}")
    def describe(dataset_id: uuid.UUID, body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return command(
            dataset_id, "describe", {"name": body.get("name"), "description": body.get("description")}
        )

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
