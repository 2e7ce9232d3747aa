"""The write side: bounded contexts, the command processor, its state store and the bus client.

`CONTEXTS` is the one list to change when a context is added.
"""

from __future__ import annotations

from commands.context import BoundedContext
from commands.datasets import CONTEXT as DATASETS
from commands.incidents import CONTEXT as INCIDENTS
from commands.webhooks import CONTEXT as WEBHOOKS

CONTEXTS: tuple[BoundedContext, ...] = (DATASETS, INCIDENTS, WEBHOOKS)


def context_named(name: str) -> BoundedContext:
    for ctx in CONTEXTS:
        if ctx.name == name:
            return ctx
    raise KeyError(name)
