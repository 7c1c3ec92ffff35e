"""The template service over real gRPC (port 0) on a fresh database per test: SQLite always,
PostgreSQL when SHOAL_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from services.template.approval import ManualReview
from services.template.config import TemplateSettings
from services.template.server import build
from shoal.errors import from_rpc_error
from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb
from shoal.v1 import template_pb2_grpc

WS = "ws_a"
OTHER_WS = "ws_b"
EMAIL, SMS, RCS = common.CHANNEL_EMAIL, common.CHANNEL_SMS, common.CHANNEL_RCS
MESSAGE, CONVERSATION, NEWSLETTER = (
    common.MESSAGE_TYPE_MESSAGE,
    common.MESSAGE_TYPE_CONVERSATION,
    common.MESSAGE_TYPE_NEWSLETTER,
)
DRAFT, PENDING, PUBLISHED, REJECTED = (
    pb.TEMPLATE_STATE_DRAFT,
    pb.TEMPLATE_STATE_PENDING_APPROVAL,
    pb.TEMPLATE_STATE_PUBLISHED,
    pb.TEMPLATE_STATE_REJECTED,
)

Stub = template_pb2_grpc.TemplateServiceStub
StubFactory = Callable[..., Any]


@pytest.fixture
async def make_stub(database_url: str, tmp_path: Path) -> AsyncIterator[StubFactory]:
    """Start template servers on one database (one per approval mode asked for)."""
    started: list[tuple[Any, grpc.aio.Channel]] = []

    async def make(**overrides: Any) -> Stub:
        approval = overrides.pop("approval", None)
        settings = TemplateSettings(database_url=database_url, data_dir=tmp_path, port=0, **overrides)
        server = await build(settings, approval=approval)
        await server.start()
        ch = grpc.aio.insecure_channel(server.address)
        started.append((server, ch))
        return template_pb2_grpc.TemplateServiceStub(ch)

    yield make
    for server, ch in reversed(started):
        await ch.close()
        await server.stop(0)


@pytest.fixture
async def stub(make_stub: StubFactory) -> Stub:
    return await make_stub()


@pytest.fixture
async def sqlite_stub(tmp_path: Path) -> AsyncIterator[Stub]:
    """For checks that refuse a request before it reaches the database: one dialect is enough."""
    server = await build(
        TemplateSettings(database_url=f"sqlite:///{tmp_path / 't.db'}", data_dir=tmp_path, port=0)
    )
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield template_pb2_grpc.TemplateServiceStub(ch)
    await server.stop(0)


def var(name: str, *, required: bool = False, default: str = "", type_: int = 0) -> pb.Variable:
    return pb.Variable(name=name, required=required, default_value=default, type=type_)


def sms(text: str) -> pb.TemplateContent:
    return pb.TemplateContent(sms=pb.SmsContent(text=text))


def email(subject: str, html: str, text: str = "") -> pb.TemplateContent:
    return pb.TemplateContent(email=pb.EmailContent(subject=subject, html=html, text=text))


def rcs(text: str = "", **kwargs: Any) -> pb.TemplateContent:
    return pb.TemplateContent(rcs=pb.RcsContent(text=text, **kwargs))


def ctx(
    key: str = "k1", contact: dict[str, Any] | None = None, data: dict[str, Any] | None = None
) -> pb.RenderContext:
    c = struct_pb2.Struct()
    c.update(contact or {})
    d = struct_pb2.Struct()
    d.update(data or {})
    return pb.RenderContext(key=key, contact=c, data=d)


async def create(
    stub: Stub,
    content: pb.TemplateContent,
    *,
    channel: int = SMS,
    message_type: int = MESSAGE,
    variables: list[pb.Variable] | None = None,
    ws: str = WS,
    name: str = "welcome",
) -> pb.Template:
    reply = await stub.CreateTemplate(
        pb.CreateTemplateRequest(
            workspace_id=ws,
            name=name,
            channel=channel,
            message_type=message_type,
            content=content,
            variables=variables or [],
        )
    )
    return reply.template


async def publish(stub: Stub, template_id: str, version: int = 0, ws: str = WS) -> pb.TemplateVersion:
    reply = await stub.PublishTemplate(
        pb.PublishTemplateRequest(workspace_id=ws, template_id=template_id, version=version)
    )
    return reply.version


async def render_batch(
    stub: Stub, template_id: str, contexts: list[pb.RenderContext], version: int = 0, ws: str = WS
) -> pb.RenderBatchResponse:
    return await stub.RenderBatch(
        pb.RenderBatchRequest(
            workspace_id=ws,
            template=pb.TemplateRef(template_id=template_id, version=version),
            contexts=contexts,
        )
    )


async def rpc_error(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return caught.value


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {v.field: v.description for v in from_rpc_error(error).violations}


# --- CRUD and versions -----------------------------------------------------------------------


async def test_create_get_and_list_versions(stub: Stub) -> None:
    tpl = await create(
        stub, sms("Hi {{ contact.first_name }}"), variables=[var("contact.first_name", required=True)]
    )
    assert tpl.id.startswith("tpl_")
    assert tpl.workspace_id == WS
    assert (tpl.latest_version, tpl.published_version) == (1, 0)
    assert tpl.current.state == DRAFT
    assert tpl.current.content.sms.text == "Hi {{ contact.first_name }}"
    assert tpl.current.variables[0].required

    got = (await stub.GetTemplate(pb.GetTemplateRequest(workspace_id=WS, template_id=tpl.id))).template
    assert got == tpl

    updated = (
        await stub.UpdateTemplate(
            pb.UpdateTemplateRequest(
                workspace_id=WS,
                template_id=tpl.id,
                name="welcome v2",
                content=sms("Hello {{ contact.first_name }}"),
                variables=[var("contact.first_name", required=True)],
            )
        )
    ).template
    assert (updated.name, updated.latest_version, updated.current.state) == ("welcome v2", 2, DRAFT)

    versions = (await stub.ListVersions(pb.ListVersionsRequest(workspace_id=WS, template_id=tpl.id))).versions
    assert [(v.version, v.content.sms.text) for v in versions] == [
        (1, "Hi {{ contact.first_name }}"),
        (2, "Hello {{ contact.first_name }}"),
    ]

    # A rename alone makes no version; variables alone re-use the latest content.
    renamed = (
        await stub.UpdateTemplate(pb.UpdateTemplateRequest(workspace_id=WS, template_id=tpl.id, name="w3"))
    ).template
    assert (renamed.name, renamed.latest_version) == ("w3", 2)
    re_declared = (
        await stub.UpdateTemplate(
            pb.UpdateTemplateRequest(
                workspace_id=WS, template_id=tpl.id, variables=[var("contact.first_name", default="there")]
            )
        )
    ).template
    assert re_declared.latest_version == 3
    assert re_declared.current.content.sms.text == "Hello {{ contact.first_name }}"


async def test_unknown_template_and_missing_fields(stub: Stub) -> None:
    err = await rpc_error(stub.GetTemplate(pb.GetTemplateRequest(workspace_id=WS, template_id="tpl_nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(stub.GetTemplate(pb.GetTemplateRequest(workspace_id="", template_id="tpl_x")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "workspace_id" in violations(err)
    err = await rpc_error(stub.CreateTemplate(pb.CreateTemplateRequest(workspace_id=WS)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"name", "channel", "message_type"} <= set(violations(err))


async def test_list_filters_and_pages(stub: Stub) -> None:
    sms_ids = [(await create(stub, sms(f"sms {i}"), name=f"s{i}")).id for i in range(5)]
    mail = await create(stub, email("Hi", "<p>hi</p>"), channel=EMAIL, message_type=NEWSLETTER)
    await publish(stub, sms_ids[0])
    await create(stub, sms("other workspace"), ws=OTHER_WS)

    async def ids(**filters: Any) -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            reply = await stub.ListTemplates(
                pb.ListTemplatesRequest(
                    workspace_id=WS, page=common.PageRequest(page_size=2, page_token=token), **filters
                )
            )
            assert len(reply.templates) <= 2
            out.extend(t.id for t in reply.templates)
            token = reply.page.next_page_token
            if not token:
                return out

    assert await ids() == [mail.id, *reversed(sms_ids)]
    assert await ids(channel=SMS) == list(reversed(sms_ids))
    assert await ids(channel=EMAIL, message_type=NEWSLETTER) == [mail.id]
    assert await ids(channel=EMAIL, message_type=MESSAGE) == []
    assert await ids(state=PUBLISHED) == [sms_ids[0]]
    assert await ids(state=DRAFT) == [mail.id, *reversed(sms_ids[1:])]
    err = await rpc_error(
        stub.ListTemplates(pb.ListTemplatesRequest(workspace_id=WS, page=common.PageRequest(page_token="zz")))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- state machine ---------------------------------------------------------------------------


async def test_sms_and_email_publish_directly_and_final_states_refuse_moves(stub: Stub) -> None:
    tpl = await create(stub, sms("Hi"))
    version = await publish(stub, tpl.id, 1)
    assert version.state == PUBLISHED
    assert version.publish_time.seconds > 0
    got = (await stub.GetTemplate(pb.GetTemplateRequest(workspace_id=WS, template_id=tpl.id))).template
    assert got.published_version == 1

    err = await rpc_error(publish(stub, tpl.id, 1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is PUBLISHED" in err.details()
    err = await rpc_error(
        stub.RejectTemplate(
            pb.RejectTemplateRequest(workspace_id=WS, template_id=tpl.id, version=1, reason="no")
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is PUBLISHED" in err.details()

    mail = await create(stub, email("Hi", "<p>x</p>"), channel=EMAIL)
    assert (await publish(stub, mail.id)).state == PUBLISHED


async def test_reject_draft_needs_reason_and_rejected_is_final(stub: Stub) -> None:
    tpl = await create(stub, sms("Hi"))
    err = await rpc_error(
        stub.RejectTemplate(
            pb.RejectTemplateRequest(workspace_id=WS, template_id=tpl.id, version=1, reason=" ")
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in violations(err)

    rejected = (
        await stub.RejectTemplate(
            pb.RejectTemplateRequest(workspace_id=WS, template_id=tpl.id, version=1, reason="tone of voice")
        )
    ).version
    assert (rejected.state, rejected.rejection_reason) == (REJECTED, "tone of voice")
    for call in (
        publish(stub, tpl.id, 1),
        stub.RejectTemplate(
            pb.RejectTemplateRequest(workspace_id=WS, template_id=tpl.id, version=1, reason="x")
        ),
    ):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is REJECTED" in err.details()
    err = await rpc_error(publish(stub, tpl.id, 7))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_rcs_approval_modes(make_stub: StubFactory) -> None:
    approve = await make_stub(rcs_approval="approve")
    tpl = await create(approve, rcs("Hello"), channel=RCS)
    assert (await publish(approve, tpl.id)).state == PUBLISHED

    reject = await make_stub(rcs_approval="reject")
    tpl = await create(reject, rcs("Hello"), channel=RCS)
    version = await publish(reject, tpl.id)
    assert version.state == REJECTED
    assert "provider" in version.rejection_reason

    manual = await make_stub(rcs_approval="manual")
    first = await create(manual, rcs("Hello"), channel=RCS)
    assert (await publish(manual, first.id)).state == PENDING
    got = (await manual.GetTemplate(pb.GetTemplateRequest(workspace_id=WS, template_id=first.id))).template
    assert (got.current.state, got.published_version) == (PENDING, 0)
    # Not sendable while waiting.
    err = await rpc_error(render_batch(manual, first.id, [ctx()], version=1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "PENDING_APPROVAL" in err.details()
    # The operator records the provider's answer.
    assert (await publish(manual, first.id)).state == PUBLISHED

    second = await create(manual, rcs("Hello"), channel=RCS)
    await publish(manual, second.id)
    rejected = (
        await manual.RejectTemplate(
            pb.RejectTemplateRequest(
                workspace_id=WS, template_id=second.id, reason="carrier refused the brand"
            )
        )
    ).version
    assert (rejected.state, rejected.rejection_reason) == (REJECTED, "carrier refused the brand")


async def test_approval_interface_is_injectable(make_stub: StubFactory) -> None:
    stub = await make_stub(approval=ManualReview())
    tpl = await create(stub, rcs("Hi"), channel=RCS)
    assert (await publish(stub, tpl.id)).state == PENDING
    # EMAIL and SMS never ask the provider.
    tpl = await create(stub, sms("Hi"))
    assert (await publish(stub, tpl.id)).state == PUBLISHED


async def test_later_version_published_while_pinned_earlier_still_renders(stub: Stub) -> None:
    tpl = await create(stub, sms("v1 {{ data.code }}"), variables=[var("data.code", required=True)])
    await publish(stub, tpl.id, 1)
    await stub.UpdateTemplate(
        pb.UpdateTemplateRequest(
            workspace_id=WS,
            template_id=tpl.id,
            content=sms("v2 {{ data.code }}"),
            variables=[var("data.code", required=True)],
        )
    )
    # Version 2 is a draft: "latest published" is still 1, and a pin on 2 is refused.
    latest = await render_batch(stub, tpl.id, [ctx(data={"code": "A"})])
    assert (latest.version, latest.messages[0].text) == (1, "v1 A")
    err = await rpc_error(render_batch(stub, tpl.id, [ctx()], version=2))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "DRAFT" in err.details()

    await publish(stub, tpl.id, 2)
    got = (await stub.GetTemplate(pb.GetTemplateRequest(workspace_id=WS, template_id=tpl.id))).template
    assert got.published_version == 2
    latest = await render_batch(stub, tpl.id, [ctx(data={"code": "B"})])
    assert (latest.version, latest.messages[0].text) == (2, "v2 B")
    pinned = await render_batch(stub, tpl.id, [ctx(data={"code": "C"})], version=1)
    assert (pinned.version, pinned.messages[0].text) == (1, "v1 C")
    versions = (await stub.ListVersions(pb.ListVersionsRequest(workspace_id=WS, template_id=tpl.id))).versions
    assert [v.state for v in versions] == [PUBLISHED, PUBLISHED]


async def test_nothing_published_cannot_render(stub: Stub) -> None:
    tpl = await create(stub, sms("Hi"))
    err = await rpc_error(render_batch(stub, tpl.id, [ctx()]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no PUBLISHED version" in err.details()


# --- content limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "content", "field", "words"),
    [
        (SMS, sms("x" * 1601), "content.sms.text", "longer than 1600 characters"),
        (SMS, sms(""), "content.sms.text", "is required"),
        (SMS, email("s", "<p>x</p>"), "content.email", "SMS template carries content.sms"),
        (EMAIL, email("", "<p>x</p>"), "content.email.subject", "is required"),
        (EMAIL, email("a" * 999, "<p>x</p>"), "content.email.subject", "longer than 998 characters"),
        (EMAIL, email("s", ""), "content.email.html", "html or text is required"),
        (EMAIL, email("line\nbreak", "<p>x</p>"), "content.email.subject", "one line"),
        (RCS, rcs("x" * 3073), "content.rcs.text", "longer than 3072 characters"),
        (
            RCS,
            rcs("hi", suggestions=[pb.Suggestion(text="s", postback="p")] * 12),
            "content.rcs.suggestions",
            "more than 11 suggestions",
        ),
        (
            RCS,
            rcs("hi", suggestions=[pb.Suggestion(text="x" * 26, postback="p")]),
            "content.rcs.suggestions[0].text",
            "longer than 25 characters",
        ),
        (
            RCS,
            rcs(rich_card=pb.RichCard(title="t" * 201)),
            "content.rcs.rich_card.title",
            "longer than 200 characters",
        ),
        (
            RCS,
            rcs(rich_card=pb.RichCard(title="t", description="d" * 2001)),
            "content.rcs.rich_card.description",
            "longer than 2000 characters",
        ),
        (
            RCS,
            rcs(rich_card=pb.RichCard(title="t", media_url="http://cdn.example/x.png")),
            "content.rcs.rich_card.media_url",
            "https",
        ),
        (RCS, rcs(carousel=[pb.RichCard(title="only one")]), "content.rcs.carousel", "2 to 10"),
        (RCS, rcs(carousel=[pb.RichCard(title="c")] * 11), "content.rcs.carousel", "2 to 10"),
        (RCS, rcs(), "content.rcs.text", "text, rich_card or carousel is required"),
    ],
)
async def test_content_limits_are_refused_with_field_and_limit(
    sqlite_stub: Stub, channel: int, content: pb.TemplateContent, field: str, words: str
) -> None:
    err = await rpc_error(create(sqlite_stub, content, channel=channel))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err)
    assert field in found, found
    assert words in found[field]
    assert field in err.details()


async def test_limits_within_bounds_are_accepted(stub: Stub) -> None:
    await create(stub, sms("x" * 1600))
    await create(
        stub,
        rcs(
            "hi",
            suggestions=[pb.Suggestion(text="x" * 25, postback="p")] * 11,
        ),
        channel=RCS,
    )
    await create(
        stub,
        rcs(carousel=[pb.RichCard(title="c", media_url="https://cdn.example/x.png")] * 10),
        channel=RCS,
    )


async def test_update_is_validated_too(stub: Stub) -> None:
    tpl = await create(stub, sms("Hi"))
    err = await rpc_error(
        stub.UpdateTemplate(
            pb.UpdateTemplateRequest(
                workspace_id=WS, template_id=tpl.id, content=sms("{{ data.undeclared }}")
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not declared" in violations(err)["content.sms.text"]
    versions = (await stub.ListVersions(pb.ListVersionsRequest(workspace_id=WS, template_id=tpl.id))).versions
    assert len(versions) == 1  # nothing half-written


# --- variables and rendering -----------------------------------------------------------------


async def test_variables_declared_typed_and_checked_at_save(stub: Stub) -> None:
    err = await rpc_error(create(stub, sms("Hi {{ contact.first_name }}")))
    assert "contact.first_name" in violations(err)["content.sms.text"]
    err = await rpc_error(
        create(
            stub,
            sms("Hi"),
            variables=[
                var("first_name"),
                var("data.n", type_=pb.VARIABLE_TYPE_NUMBER, default="many"),
                var("data.x", required=True, default="d"),
                var("data.y"),
                var("data.y"),
            ],
        )
    )
    found = violations(err)
    assert "variables[0].name" in found
    assert "number" in found["variables[1].default_value"]
    assert "variables[2].default_value" in found
    assert "twice" in found["variables[4].name"]


async def test_render_batch_missing_required_defaults_and_unicode(stub: Stub) -> None:
    tpl = await create(
        stub,
        sms("Hi {{ contact.first_name }}, order {{ data.order.id }} ({{ data.note }})"),
        variables=[
            var("contact.first_name", required=True),
            var("data.order.id", required=True, type_=pb.VARIABLE_TYPE_NUMBER),
            var("data.note", default="no note"),
        ],
    )
    await publish(stub, tpl.id)
    reply = await render_batch(
        stub,
        tpl.id,
        [
            ctx("ok", {"first_name": "Zoë"}, {"order": {"id": 42}, "note": "€5"}),
            ctx("default", {"first_name": "Ann"}, {"order": {"id": 7.5}}),
            ctx("missing", {}, {"order": {"id": 1}}),
            ctx("empty", {"first_name": None}, {}),
            ctx("unicode", {"first_name": "山田"}, {"order": {"id": 3}}),
        ],
    )
    assert (reply.version, reply.channel, reply.message_type) == (1, SMS, MESSAGE)
    by_key = {m.key: m for m in reply.messages}
    assert by_key["ok"].text == "Hi Zoë, order 42 (€5)"
    assert (by_key["ok"].billing_unit, by_key["ok"].units) == (common.BILLING_UNIT_SMS_SEGMENT, 1)
    assert by_key["default"].text == "Hi Ann, order 7.5 (no note)"
    assert by_key["missing"].error == "missing required variable contact.first_name"
    assert by_key["missing"].text == ""
    assert by_key["empty"].error == "missing required variables contact.first_name, data.order.id"
    assert by_key["unicode"].text == "Hi 山田, order 3 (no note)"
    assert by_key["unicode"].units == 1  # UCS-2, 26 chars


async def test_sms_segments_in_render(stub: Stub) -> None:
    tpl = await create(stub, sms("{{ data.body }}"), variables=[var("data.body", required=True)])
    await publish(stub, tpl.id)
    bodies = {
        "gsm160": "a" * 160,
        "gsm161": "a" * 161,
        "ext80": "€" * 80,
        "ext81": "€" * 81,
        "ucs70": "ж" * 70,
        "ucs71": "ж" * 71,
        "emoji": "😀" * 36,
    }
    reply = await render_batch(stub, tpl.id, [ctx(k, data={"body": v}) for k, v in bodies.items()])
    units = {m.key: m.units for m in reply.messages}
    assert units == {"gsm160": 1, "gsm161": 2, "ext80": 1, "ext81": 2, "ucs70": 1, "ucs71": 2, "emoji": 2}
    too_long = await render_batch(stub, tpl.id, [ctx("long", data={"body": "a" * 1601})])
    assert "longer than 1600" in too_long.messages[0].error


async def test_email_escaping_text_derivation_and_unsubscribe(make_stub: StubFactory) -> None:
    stub = await make_stub(unsubscribe_url="https://unsub.example/u/{{contact.id}}")
    tpl = await create(
        stub,
        email(
            "Hello {{ contact.first_name }}",
            "<html><head><style>p {color: red}</style></head><body><p>Dear {{ contact.first_name }},</p>"
            "<p>your code&nbsp;is <b>{{ data.code }}</b></p></body></html>",
        ),
        channel=EMAIL,
        message_type=NEWSLETTER,
        variables=[var("contact.first_name", required=True), var("data.code", default="none")],
    )
    await publish(stub, tpl.id)
    hostile = '<script>alert("x")</script> & Co'
    reply = await render_batch(
        stub,
        tpl.id,
        [
            ctx("a", {"id": "c_1", "first_name": hostile}, {"code": "A&B"}),
            ctx("no-id", {"first_name": "Ann"}),
            ctx("crlf", {"id": "c_2", "first_name": "Ann\r\nBcc: victim@example.com"}),
        ],
    )
    a, no_id, crlf = reply.messages
    assert a.subject == "Hello " + hostile  # a subject is text, not html
    assert "<script>" not in a.html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co" in a.html
    assert "<b>A&amp;B</b>" in a.html
    assert a.text == f"Dear {hostile}, your code is A&B"
    assert (a.billing_unit, a.units) == (common.BILLING_UNIT_EMAIL, 1)
    assert a.headers["List-Unsubscribe"] == "<https://unsub.example/u/c_1>"
    assert a.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "contact.id" in no_id.error
    assert "\n" not in crlf.subject and "\r" not in crlf.subject

    # MESSAGE emails carry no List-Unsubscribe; an explicit text wins over the derived one.
    plain = await create(
        stub,
        email("Hi", "<p>html</p>", text="Own text"),
        channel=EMAIL,
        message_type=MESSAGE,
    )
    await publish(stub, plain.id)
    message = (await render_batch(stub, plain.id, [ctx()])).messages[0]
    assert message.text == "Own text"
    assert dict(message.headers) == {}


async def test_rcs_render_and_billing_units(stub: Stub) -> None:
    basic = await create(stub, rcs("{{ data.t }}"), channel=RCS, variables=[var("data.t", required=True)])
    await publish(stub, basic.id)
    reply = await render_batch(
        stub, basic.id, [ctx("short", data={"t": "x" * 160}), ctx("long", data={"t": "x" * 161})]
    )
    units = {m.key: m.billing_unit for m in reply.messages}
    assert units == {"short": common.BILLING_UNIT_RCS_BASIC, "long": common.BILLING_UNIT_RCS_SINGLE}

    rich = await create(
        stub,
        rcs(
            "Hi",
            suggestions=[pb.Suggestion(text="{{ data.label }}", postback="yes")],
            rich_card=pb.RichCard(
                title="Order {{ data.order }}",
                media_url="https://cdn.example/{{ data.order }}.png",
                suggestions=[pb.Suggestion(text="Track", url="https://track.example/{{ data.order }}")],
            ),
        ),
        channel=RCS,
        variables=[var("data.label", default="Yes"), var("data.order", required=True)],
    )
    await publish(stub, rich.id)
    reply = await render_batch(
        stub,
        rich.id,
        [ctx("ok", data={"order": "A1"}), ctx("label", data={"order": "A2", "label": "y" * 26})],
    )
    ok, too_long = reply.messages
    assert ok.billing_unit == common.BILLING_UNIT_RCS_SINGLE
    assert ok.suggestions[0].text == "Yes"
    assert ok.rich_card.title == "Order A1"
    assert ok.rich_card.media_url == "https://cdn.example/A1.png"
    assert ok.rich_card.suggestions[0].url == "https://track.example/A1"
    assert "suggestions[0].text" in too_long.error
    assert "25" in too_long.error


async def test_preview_renders_drafts_with_placeholders(stub: Stub) -> None:
    tpl = await create(
        stub,
        sms("Hi {{ contact.first_name }} {{ data.x }}"),
        variables=[var("contact.first_name", required=True), var("data.x", default="X")],
    )
    preview = (
        await stub.Preview(pb.PreviewRequest(workspace_id=WS, template=pb.TemplateRef(template_id=tpl.id)))
    ).message
    assert preview.text == "Hi [contact.first_name] X"
    preview = (
        await stub.Preview(
            pb.PreviewRequest(
                workspace_id=WS,
                template=pb.TemplateRef(template_id=tpl.id, version=1),
                context=ctx(contact={"first_name": "Ann"}),
            )
        )
    ).message
    assert preview.text == "Hi Ann X"


# --- injection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ __class__ }}",
        "{{ contact.__class__ }}",
        "{{ contact.__class__.__mro__ }}",
        "{{ data.x.__globals__ }}",
        "{{ contact.first_name|upper }}",
        "{{ contact['first_name'] }}",
        "{{ data.items[0] }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ config }}",
        "{{ 7*7 }}",
        "{{ contact.first_name }",
    ],
)
async def test_injection_in_template_is_refused_at_save(sqlite_stub: Stub, source: str) -> None:
    err = await rpc_error(create(sqlite_stub, sms(source), variables=[var("contact.first_name")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "content.sms.text" in violations(err)


async def test_other_syntaxes_render_as_literal_text(stub: Stub) -> None:
    source = "{% for x in y %}{0.__class__} {contact.first_name} %(name)s ${data} <%= 7*7 %> {{ data.v }}"
    tpl = await create(stub, sms(source), variables=[var("data.v", default="d")])
    await publish(stub, tpl.id)
    # Values that look like templates are inserted as text, never evaluated.
    reply = await render_batch(
        stub, tpl.id, [ctx(data={"v": "{{ contact.first_name }} {0.__class__} {% debug %}"})]
    )
    assert reply.messages[0].text == (
        "{% for x in y %}{0.__class__} {contact.first_name} %(name)s ${data} <%= 7*7 %> "
        "{{ contact.first_name }} {0.__class__} {% debug %}"
    )


# --- launch checks ---------------------------------------------------------------------------


async def test_validate_for_launch(stub: Stub) -> None:
    ok = await create(stub, sms("ok"))
    await publish(stub, ok.id)
    await stub.UpdateTemplate(pb.UpdateTemplateRequest(workspace_id=WS, template_id=ok.id, content=sms("v2")))
    draft = await create(stub, sms("draft"))
    rejected = await create(stub, sms("no"))
    await stub.RejectTemplate(
        pb.RejectTemplateRequest(workspace_id=WS, template_id=rejected.id, version=1, reason="spammy")
    )
    mail = await create(stub, email("s", "<p>x</p>"), channel=EMAIL, message_type=NEWSLETTER)
    await publish(stub, mail.id)
    foreign = await create(stub, sms("theirs"), ws=OTHER_WS)
    await publish(stub, foreign.id, ws=OTHER_WS)

    def check(
        node: str, template_id: str, version: int = 0, channel: int = SMS, mt: int = MESSAGE
    ) -> pb.LaunchCheck:
        return pb.LaunchCheck(
            node_id=node,
            template=pb.TemplateRef(template_id=template_id, version=version),
            channel=channel,
            message_type=mt,
        )

    reply = await stub.ValidateForLaunch(
        pb.ValidateForLaunchRequest(
            workspace_id=WS,
            checks=[
                check("latest", ok.id),
                check("pinned", ok.id, 1),
                check("pinned_draft", ok.id, 2),
                check("draft", draft.id),
                check("rejected", rejected.id, 1),
                check("wrong_channel", mail.id, channel=SMS, mt=NEWSLETTER),
                check("wrong_type", mail.id, channel=EMAIL, mt=MESSAGE),
                check("unknown", "tpl_missing"),
                check("foreign", foreign.id),
                check("no_version", ok.id, 9),
                check("mail_ok", mail.id, channel=EMAIL, mt=NEWSLETTER),
            ],
        )
    )
    assert not reply.ok
    assert dict(reply.resolved_versions) == {"latest": 1, "pinned": 1, "mail_ok": 1}
    problems: dict[str, list[str]] = {}
    for p in reply.problems:
        problems.setdefault(p.node_id, []).append(p.reason)
    assert set(problems) == {
        "pinned_draft",
        "draft",
        "rejected",
        "wrong_channel",
        "wrong_type",
        "unknown",
        "foreign",
        "no_version",
    }
    assert problems["pinned_draft"] == [f"template {ok.id} version 2 is DRAFT, not PUBLISHED"]
    assert problems["draft"] == [f"template {draft.id} has no PUBLISHED version (latest version 1 is DRAFT)"]
    assert problems["rejected"] == [f"template {rejected.id} version 1 is REJECTED (spammy), not PUBLISHED"]
    assert problems["wrong_channel"] == [f"template {mail.id} is for channel EMAIL, the node sends on SMS"]
    assert problems["wrong_type"] == [
        f"template {mail.id} is for message type NEWSLETTER, the node sends MESSAGE"
    ]
    assert problems["unknown"] == ["template tpl_missing not found"]
    assert problems["foreign"] == [f"template {foreign.id} not found"]
    assert problems["no_version"] == [f"template {ok.id} has no version 9"]

    good = await stub.ValidateForLaunch(
        pb.ValidateForLaunchRequest(workspace_id=WS, checks=[check("n1", ok.id)])
    )
    assert good.ok and not good.problems and dict(good.resolved_versions) == {"n1": 1}


# --- workspace isolation ---------------------------------------------------------------------


async def test_workspaces_never_see_each_other(stub: Stub) -> None:
    mine = await create(stub, sms("mine"))
    await publish(stub, mine.id)
    # Warm the render cache from the owning workspace first: the cache must not leak either.
    await render_batch(stub, mine.id, [ctx()], version=1)
    calls = [
        stub.GetTemplate(pb.GetTemplateRequest(workspace_id=OTHER_WS, template_id=mine.id)),
        stub.ListVersions(pb.ListVersionsRequest(workspace_id=OTHER_WS, template_id=mine.id)),
        stub.UpdateTemplate(
            pb.UpdateTemplateRequest(workspace_id=OTHER_WS, template_id=mine.id, content=sms("theirs"))
        ),
        stub.PublishTemplate(
            pb.PublishTemplateRequest(workspace_id=OTHER_WS, template_id=mine.id, version=1)
        ),
        stub.RejectTemplate(
            pb.RejectTemplateRequest(workspace_id=OTHER_WS, template_id=mine.id, version=1, reason="x")
        ),
        render_batch(stub, mine.id, [ctx()], version=1, ws=OTHER_WS),
        render_batch(stub, mine.id, [ctx()], ws=OTHER_WS),
        stub.Preview(pb.PreviewRequest(workspace_id=OTHER_WS, template=pb.TemplateRef(template_id=mine.id))),
    ]
    for call in calls:
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListTemplates(pb.ListTemplatesRequest(workspace_id=OTHER_WS))
    assert list(listed.templates) == []


# --- throughput ------------------------------------------------------------------------------


async def test_render_batch_of_ten_thousand(stub: Stub) -> None:
    tpl = await create(
        stub,
        sms("Hi {{ contact.first_name }}, your order {{ data.order_id }} ships today."),
        variables=[var("contact.first_name", required=True), var("data.order_id", required=True)],
    )
    await publish(stub, tpl.id)
    contexts = [ctx(f"e{i}", {"first_name": f"Name{i}"}, {"order_id": f"O-{i}"}) for i in range(10_000)]
    await render_batch(stub, tpl.id, contexts[:10])  # compile and cache the version
    started = time.perf_counter()
    reply = await render_batch(stub, tpl.id, contexts)
    elapsed = time.perf_counter() - started
    assert len(reply.messages) == 10_000
    assert reply.messages[9_999].text == "Hi Name9999, your order O-9999 ships today."
    assert not any(m.error for m in reply.messages)
    print(f"RenderBatch 10,000 over gRPC: {elapsed * 1000:.0f} ms, {10_000 / elapsed:,.0f} renders/s")


async def test_concurrent_edits_get_distinct_versions(stub: Stub) -> None:
    tpl = await create(stub, sms("v1"))
    await asyncio.gather(
        *(
            stub.UpdateTemplate(
                pb.UpdateTemplateRequest(workspace_id=WS, template_id=tpl.id, content=sms(f"edit {i}"))
            )
            for i in range(5)
        )
    )
    versions = (await stub.ListVersions(pb.ListVersionsRequest(workspace_id=WS, template_id=tpl.id))).versions
    assert [v.version for v in versions] == [1, 2, 3, 4, 5, 6]
    assert len({v.content.sms.text for v in versions}) == 6


async def test_concurrent_publishes_move_once(make_stub: StubFactory) -> None:
    stub = await make_stub(rcs_approval="manual")
    tpl = await create(stub, rcs("hi"), channel=RCS)
    await publish(stub, tpl.id)
    results = await asyncio.gather(
        *(publish(stub, tpl.id, 1) for _ in range(3)),
        return_exceptions=True,
    )
    published = [r for r in results if isinstance(r, pb.TemplateVersion)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(published) == 1 and published[0].state == PUBLISHED
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in refused)


async def test_render_batch_size_is_capped(make_stub: StubFactory) -> None:
    stub = await make_stub(max_batch_size=3)
    tpl = await create(stub, sms("hi"))
    await publish(stub, tpl.id)
    assert len((await render_batch(stub, tpl.id, [ctx(str(i)) for i in range(3)])).messages) == 3
    err = await rpc_error(render_batch(stub, tpl.id, [ctx(str(i)) for i in range(4)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contexts" in violations(err)


async def test_rcs_rendered_as_sms_fallback(stub: Stub) -> None:
    card = pb.RichCard(
        title="Sale {{ contact.first_name }}",
        description="Up to 50% off",
        media_url="https://example.com/a.png",
        suggestions=[
            pb.Suggestion(text="Shop", url="https://example.com/shop"),
            pb.Suggestion(text="Later", postback="x"),
        ],
    )
    tpl = await create(
        stub, rcs("Hi!", rich_card=card), channel=RCS, variables=[var("contact.first_name", required=True)]
    )
    await publish(stub, tpl.id)
    as_rcs = await render_batch(stub, tpl.id, [ctx(contact={"first_name": "Ada"})])
    assert as_rcs.messages[0].billing_unit == common.BILLING_UNIT_RCS_SINGLE
    reply = await stub.RenderBatch(
        pb.RenderBatchRequest(
            workspace_id=WS,
            template=pb.TemplateRef(template_id=tpl.id),
            contexts=[ctx(contact={"first_name": "Ada"})],
            as_sms=True,
        )
    )
    message = reply.messages[0]
    assert message.text == "Hi!\nSale Ada\nUp to 50% off\nShop: https://example.com/shop"
    assert not message.HasField("rich_card") and not message.suggestions
    assert (message.billing_unit, message.units) == (common.BILLING_UNIT_SMS_SEGMENT, 1)
    # A missing required variable stays an error in the fallback too.
    failed = await stub.RenderBatch(
        pb.RenderBatchRequest(
            workspace_id=WS, template=pb.TemplateRef(template_id=tpl.id), contexts=[ctx()], as_sms=True
        )
    )
    assert "contact.first_name" in failed.messages[0].error
    sms_tpl = await create(stub, sms("plain"), name="plain")
    await publish(stub, sms_tpl.id)
    err = await rpc_error(
        stub.RenderBatch(
            pb.RenderBatchRequest(
                workspace_id=WS,
                template=pb.TemplateRef(template_id=sms_tpl.id),
                contexts=[ctx()],
                as_sms=True,
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "as_sms" in violations(err)
