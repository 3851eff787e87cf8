"""What a serving process does for itself once it is up."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any, cast

from federation.hub.server import _freeze_heap_when_ready


async def test_the_heap_made_while_starting_is_left_out_of_collections_once_the_hub_is_ready() -> None:
    runtime = SimpleNamespace(ready=False)
    assert gc.get_freeze_count() == 0
    freezing = asyncio.create_task(_freeze_heap_when_ready(cast(Any, runtime)))
    await asyncio.sleep(0.3)
    assert not freezing.done() and gc.get_freeze_count() == 0  # still loading: nothing frozen yet
    runtime.ready = True
    await asyncio.wait_for(freezing, 5)
    try:
        assert gc.get_freeze_count() > 1_000
    finally:
        gc.unfreeze()
