"""The small, hot campaign state workers need, in a JetStream key-value bucket.

The campaign service writes every state move here (and publishes the move as an event); workers
read the states of the campaigns in a batch with one lookup each, so a worker never calls the
campaign service per message, and a pause reaches every worker on its next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from shoal.bus import Bus, stream_replicas
from shoal.v1 import campaign_pb2 as cpb

BUCKET = "CAMPAIGN_STATES"
RUNNING = cpb.CAMPAIGN_STATE_RUNNING


class CampaignStates:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> CampaignStates:
        name = bus.stream_name(BUCKET)
        try:
            kv = await bus.js.key_value(name)
        except BucketNotFoundError:
            # As many copies as the streams (SHOAL_NATS_STREAM_REPLICAS): losing a server must not
            # lose the states the workers gate on. An existing bucket keeps its replica count.
            kv = await bus.js.create_key_value(bucket=name, history=1, replicas=stream_replicas())
        return cls(kv)

    async def put(self, campaign_id: str, state: int) -> None:
        await self.kv.put(campaign_id, cpb.CampaignState.Name(state).encode())

    async def get(self, campaign_id: str) -> int:
        """The campaign's state; UNSPECIFIED when unknown."""
        try:
            entry = await self.kv.get(campaign_id)
        except KeyNotFoundError:
            return cpb.CAMPAIGN_STATE_UNSPECIFIED
        if entry.value is None:
            return cpb.CAMPAIGN_STATE_UNSPECIFIED
        return int(cpb.CampaignState.Value(entry.value.decode()))

    async def get_many(self, campaign_ids: Iterable[str]) -> dict[str, int]:
        ids = sorted(set(campaign_ids))
        states = await asyncio.gather(*(self.get(cid) for cid in ids))
        return dict(zip(ids, states, strict=True))
