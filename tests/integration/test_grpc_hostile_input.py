"""Hostile gRPC input against a real service (segment, on a real database): giant messages, deep
nesting, invalid UTF-8 and SQL in every string. Each is refused or stored as plain data, and the
server keeps answering afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.segment.config import SegmentSettings
from services.segment.server import build
from shoal.errors import from_rpc_error
from shoal.grpc import MAX_MESSAGE_BYTES, GrpcServer
from shoal.v1 import common_pb2, segment_pb2_grpc
from shoal.v1 import segment_pb2 as pb

WS = "ws_hostile"
GET_CONTACT = "/shoal.v1.SegmentService/GetContact"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel]]:
    settings = SegmentSettings.load(
        database_url=f"sqlite:///{tmp_path / 'segment.db'}", port=0, publish_events=False, data_dir=tmp_path
    )
    server = await build(settings)
    await server.start()
    # The client may send more than the server accepts: the refusal must come from the server.
    channel = grpc.aio.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]
    )
    yield server, channel
    await channel.close()
    await server.stop(0)


async def still_serving(stub: segment_pb2_grpc.SegmentServiceStub) -> None:
    made = await stub.CreateContact(
        pb.CreateContactRequest(workspace_id=WS, contact=pb.ContactInput(email="still@example.com"))
    )
    got = await stub.GetContact(pb.GetContactRequest(workspace_id=WS, contact_id=made.contact.id))
    assert got.contact.email == "still@example.com"


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand so it can carry what a library refuses."""
    key, length = (number << 3) | 2, len(payload)
    out = bytearray([key])
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + payload


async def test_a_message_over_the_limit_is_refused_and_the_server_lives(
    served: tuple[GrpcServer, grpc.aio.Channel],
) -> None:
    _, channel = served
    stub = segment_pb2_grpc.SegmentServiceStub(channel)
    giant = pb.ImportContactsRequest(
        workspace_id=WS,
        contacts=[pb.ContactInput(email="a@example.com", first_name="x" * (MAX_MESSAGE_BYTES + 1))],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ImportContacts(giant)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await still_serving(stub)


async def test_invalid_utf8_in_a_string_field_is_refused(served: tuple[GrpcServer, grpc.aio.Channel]) -> None:
    _, channel = served
    raw = channel.unary_unary(GET_CONTACT, request_serializer=None, response_deserializer=None)
    request = field_bytes(1, WS.encode()) + field_bytes(2, b"c_\xff\xfe\xfd")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in from_rpc_error(caught.value).message
    assert "Traceback" not in str(caught.value.details()) and "DecodeError" not in str(caught.value.details())
    await still_serving(segment_pb2_grpc.SegmentServiceStub(channel))


def negated(levels: int) -> pb.Filter:
    inner = pb.Filter(tag=pb.TagCondition(tag="vip"))
    for _ in range(levels):
        inner = pb.Filter(negate=inner)
    return inner


async def test_deep_filters_are_refused_at_decode_or_by_the_depth_rule(
    served: tuple[GrpcServer, grpc.aio.Channel],
) -> None:
    _, channel = served
    stub = segment_pb2_grpc.SegmentServiceStub(channel)
    # Within protobuf's decode limit but beyond the filter rule: a precise error naming the path.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateAudience(pb.EstimateAudienceRequest(workspace_id=WS, filter=negated(40)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert any("negate" in v.field and "nest" in v.description for v in error.violations), error.violations
    # Beyond the decode limit: refused before the handler, by hand-written bytes (the client
    # library would refuse to encode it).
    body = field_bytes(5, b"\x0a\x03vip")  # Filter.tag = TagCondition(tag="vip")
    for _ in range(300):
        body = field_bytes(3, body)  # Filter.negate
    raw = channel.unary_unary(
        "/shoal.v1.SegmentService/EstimateAudience", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(field_bytes(1, WS.encode()) + field_bytes(3, body))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(caught.value).violations] == ["request"]
    await still_serving(stub)


INJECTIONS = [
    "x'; DROP TABLE contacts; --",
    '" OR 1=1 --',
    "1; DELETE FROM contacts WHERE '1'='1",
    "%' UNION SELECT * FROM contacts --",
    "\\'; TRUNCATE consent_records; --",
]


async def test_sql_in_every_string_is_stored_as_text(served: tuple[GrpcServer, grpc.aio.Channel]) -> None:
    _, channel = served
    stub = segment_pb2_grpc.SegmentServiceStub(channel)
    ids = []
    for i, text in enumerate(INJECTIONS):
        made = await stub.CreateContact(
            pb.CreateContactRequest(
                workspace_id=WS,
                contact=pb.ContactInput(
                    external_id=text,
                    email=f"inj{i}@example.com",
                    first_name=text,
                    last_name=text,
                    tags=[text[:60]],
                ),
            )
        )
        ids.append(made.contact.id)
        await stub.AddTag(pb.AddTagRequest(workspace_id=WS, contact_id=made.contact.id, tag=text[:60]))
        # Looked up by the hostile strings: found as themselves, nothing else.
        listed = await stub.ListContacts(
            pb.ListContactsRequest(workspace_id=WS, filter=pb.Filter(tag=pb.TagCondition(tag=text[:60])))
        )
        assert [c.id for c in listed.contacts] == [made.contact.id]
    for contact_id, text in zip(ids, INJECTIONS, strict=True):
        got = await stub.GetContact(pb.GetContactRequest(workspace_id=WS, contact_id=contact_id))
        assert (got.contact.external_id, got.contact.first_name) == (text, text)
    everyone = await stub.ListContacts(
        pb.ListContactsRequest(workspace_id=WS, page=common_pb2.PageRequest(page_size=100))
    )
    assert len(everyone.contacts) == len(INJECTIONS)
