"""Step workers in several processes (SHOAL_EXECUTION_PROCESSES): one durable consumer, each send once.

The execution service runs as its own OS process with `processes=2`: it starts one more process
that only runs step workers. The test proves that process works on its own (with the service
process frozen by SIGSTOP, the carrier keeps receiving messages), that a killed worker process is
started again, that killing the service process takes its worker process down with it, and that
after all of it every contact was sent exactly one message and billed once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.chaos.cluster import assert_invariants, cluster, launch, wait_carrier
from tests.helpers import wait_for

# A slow carrier (10 messages per call, 100 ms each) keeps the run going while faults land.
CARRIER = {"SHOAL_SANDBOX_LATENCY_MS": "100"}
EXECUTION = {"processes": 2, "batch_size": 20, "provider_batch_size": 10, "provider_concurrency": 1}


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.extend(int(c) for c in (task / "children").read_text().split())
    except OSError:
        return []
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(240)
async def test_worker_processes_share_the_consumer_and_send_each_contact_once(
    nats_url: str, tmp_path: Path
) -> None:
    audience = 1500
    async with cluster(nats_url=nats_url, tmp_path=tmp_path, execution=EXECUTION, sandbox_env=CARRIER) as c:
        service = c.procs["execution"]
        assert service.proc is not None
        parent = service.proc.pid
        (worker,) = await wait_for(lambda: children(parent), timeout=30, message="a step worker process")

        run = await launch(c, audience, tag="processes")

        async def fanned_out() -> bool:
            return bool((await c.run_counts(run.run_id)).fanout_done)

        await wait_for(fanned_out, timeout=60, message="the fan-out to finish")
        await wait_carrier(c, 50)

        # The service process frozen: its consumers, timers and API stop. Only the worker process
        # can move the run now, and it does.
        os.kill(parent, signal.SIGSTOP)
        try:
            frozen_at = c.carrier_count()
            assert frozen_at < audience - 200, "the run was nearly done before the freeze"
            await wait_carrier(c, frozen_at + 60, timeout=30)
        finally:
            os.kill(parent, signal.SIGCONT)

        # A worker process killed mid-run is started again by the service process.
        os.kill(worker, signal.SIGKILL)
        (replacement,) = await wait_for(
            lambda: [p for p in children(parent) if p != worker and alive(p)],
            timeout=30,
            message="a new step worker process",
        )

        # The service process killed: its worker process goes with it (parent-death signal);
        # the service started again starts a worker process of its own and finishes the run.
        at = c.carrier_count()
        assert at < audience - 100, "the run was nearly done before the service was killed"
        await c.kill("execution")
        await wait_for(lambda: not alive(replacement), timeout=30, message="the orphaned worker to exit")
        await c.start("execution")
        restarted = service.proc
        assert restarted is not None
        await wait_for(lambda: children(restarted.pid), timeout=30, message="the new service's worker")

        await assert_invariants(c, run.campaign_id, audience=audience, timeout=180)
