"""The status of a command by its id: what an asynchronous command (`Prefer:
respond-async`) became, or what a keyed synchronous one answered."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse

from api.auth import permissions as p
from api.auth.access import PrincipalDep, requires
from api.bodies import ERROR_RESPONSES, CommandStatus
from api.deps import BusDep
from api.errors import COMMANDS_PATH
from api.inputs import HeaderText

router = APIRouter(prefix=COMMANDS_PATH, tags=["commands"], responses=ERROR_RESPONSES)


@router.get(
    "/{command_id}",
    operation_id="commandStatus",
    dependencies=[requires(p.COMMANDS_READ)],
    response_model=CommandStatus,
    responses={202: {"model": CommandStatus, "description": "Not decided yet (or never sent)."}},
)
async def command_status(
    command_id: Annotated[HeaderText, Path(description="The command id (its Idempotency-Key).")],
    bus: BusDep,
    principal: PrincipalDep,
) -> JSONResponse:
    """200 with the outcome once the command is decided; 202 with Retry-After before.

    Outcomes are kept `APP_RESULT_TTL_S` (7 days); a command sent without an
    Idempotency-Key and answered synchronously has no status."""
    result = await bus.cached(principal.tenant, command_id)
    if result is None:
        pending = CommandStatus(command_id=command_id, status="pending")
        return JSONResponse(pending.model_dump(exclude_none=True), 202, {"Retry-After": "1"})
    status = CommandStatus(command_id=command_id, status=result.status, id=result.aggregate_id)
    if result.accepted:
        status.version, status.position = result.version, result.position
    else:
        status.error, status.detail = result.code, result.reason
        status.current_version = result.current_version
    return JSONResponse(status.model_dump(exclude_none=True), 200)
