"""A Ray Serve replica lost under load: `ray.kill` of its actor, then SIGKILL of its process.

The session's real Serve application (the tiny model on vLLM). Drafts are under way through the
in-process handle (``HandleDrafter``, as `medvlm run` with a local model drafts) when the replica
dies: each is asked again and answered once Serve has started a replacement. A draft has no side
effect, so asking again writes nothing twice (the EHR side is covered by the write tests).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import ray

from medvlm.dev.demo import sample_model_input
from pipeline.prompts import ModelInput
from pipeline.report import DraftResult
from serving.clients import HandleDrafter
from tests.reliability_figures import Figures, record

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

REPLICA_TITLE = "ServeReplica:medvlm:MedVLMServer"


def _replica_actor() -> Any:
    (name,) = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::medvlm#MedVLMServer#")
    ]
    return ray.get_actor(name, namespace="serve")


def _replica_pids() -> set[int]:
    """Live replica processes (a killed one may linger a moment as a zombie)."""
    return {
        p.pid
        for p in psutil.process_iter(["cmdline", "status"])
        if (p.info["cmdline"] or [""])[0].startswith(f"ray::{REPLICA_TITLE}")
        and p.info["status"] != psutil.STATUS_ZOMBIE
    }


def _kill_actor() -> None:
    ray.kill(_replica_actor(), no_restart=True)


def _kill_process() -> None:
    for pid in _replica_pids():
        os.kill(pid, signal.SIGKILL)


async def _drafts_with_a_kill(
    drafter: HandleDrafter, inputs: list[ModelInput], kill: Callable[[], None]
) -> list[DraftResult]:
    tasks = [asyncio.create_task(drafter.draft(one)) for one in inputs]
    await asyncio.sleep(2.0)  # the requests are at the replica
    assert not all(task.done() for task in tasks), "drafts finished before the replica was lost"
    kill()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize(
    "kill", [_kill_actor, _kill_process], ids=["ray-kill-actor", "sigkill-process"]
)
def test_drafts_under_way_when_the_replica_dies_are_answered_by_its_replacement(
    serve_handle: Any, kill: Callable[[], None]
) -> None:
    chest = sample_model_input()
    inputs = [chest.model_copy(update={"reference": f"study-loss-{i}"}) for i in range(3)]
    before = _replica_pids()
    started = time.monotonic()
    results = asyncio.run(_drafts_with_a_kill(HandleDrafter(serve_handle), inputs, kill))
    assert [r.reference for r in results] == [i.reference for i in inputs]
    assert all(r.finish_reason == "stop" for r in results)
    assert _replica_pids() - before  # answered by a new replica
    print(f"{kill.__name__}: 3 drafts answered {time.monotonic() - started:.0f} s after the loss")
    answered = Counter(r.reference for r in results)
    how = {_kill_actor: "`ray.kill` of its actor", _kill_process: "SIGKILL of its process"}[kill]
    record(
        Figures(
            scenario=f"replica-loss-{kill.__name__.removeprefix('_kill_')}",
            faults=f"the Serve replica lost under 3 drafts: {how}",
            studies=len(inputs),
            drafted_once=sum(n == 1 for n in answered.values()),
            lost=len(inputs) - len(answered),
            duplicated=sum(n > 1 for n in answered.values()),
            seconds=round(time.monotonic() - started, 1),
            extra={"counted": "drafts answered (no EHR in this test)"},
        )
    )
