"""Property tests of the logic-less renderer: any source either compiles or is refused with a
TemplateSyntaxError, any values render (or report `error` on the message) without raising, and
no value ever becomes markup in an email body or a reference in the output."""

from __future__ import annotations

import html
from typing import Any

from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.template import render as r
from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb

NAMES = ["contact.first_name", "contact.city", "data.order.id", "data.items"]
PIECES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["{{", "}}", "{", "}", "{%", "%}", "{{}}", "{{ . }}", "{{ __class__ }}", "<b>", "&amp;"]),
    st.sampled_from([f"{{{{ {n} }}}}" for n in NAMES] + [f"{{{{{n}}}}}" for n in NAMES]),
)
SOURCES = st.lists(PIECES, max_size=12).map("".join)
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["<script>alert(1)</script>", "{{ contact.first_name }}", "\"'&<>", "\u202e\u0000", "%s%n"]
    ),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.booleans(),
    st.none(),
)


def declared(source: str) -> list[r.VariableDecl]:
    out = []
    for name in NAMES:
        path = r.parse_path(name)
        assert path is not None
        out.append(r.VariableDecl(name, path, pb.VARIABLE_TYPE_STRING, False, ""))
    return out


def context(values: dict[str, Any]) -> pb.RenderContext:
    contact, data = struct_pb2.Struct(), struct_pb2.Struct()
    contact.update({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("contact.")})
    order = {"id": values.get("data.order.id")}
    data.update({"order": order, "items": values.get("data.items")})
    return pb.RenderContext(key="k", contact=contact, data=data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(source=SOURCES)
def test_any_source_compiles_or_is_refused_with_a_syntax_error(source: str) -> None:
    try:
        r.compile_template(
            channel=common.CHANNEL_SMS,
            message_type=common.MESSAGE_TYPE_MESSAGE,
            content=pb.TemplateContent(sms=pb.SmsContent(text=source)),
            variables=declared(source),
        )
    except r.TemplateSyntaxError as exc:
        assert str(exc)  # says what is wrong


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    values=st.fixed_dictionaries({n: VALUES for n in NAMES}),
    # No lone surrogates (category Cs): protobuf strings are UTF-8, so none can arrive over gRPC.
    literal=st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{}<>&"), max_size=20
    ),
)
def test_values_never_become_markup_or_references(values: dict[str, Any], literal: str) -> None:
    body = f"<p>{literal}{{{{ contact.first_name }}}}|{{{{ data.order.id }}}}</p>"
    template = r.compile_template(
        channel=common.CHANNEL_EMAIL,
        message_type=common.MESSAGE_TYPE_MESSAGE,
        content=pb.TemplateContent(email=pb.EmailContent(subject="Hi {{ contact.first_name }}", html=body)),
        variables=declared(body),
    )
    out = r.render(template, context(values))
    if out.error:
        return  # reported on the message, not raised
    rendered = out.html
    assert rendered.startswith("<p>") and rendered.endswith("</p>")
    inner = rendered[3:-4]
    # Every '<' inside came from a value and was escaped; no value re-entered the renderer.
    assert "<" not in inner and ">" not in inner
    name = values["contact.first_name"]
    if isinstance(name, str) and name:
        assert html.escape(name, quote=True) in inner or html.escape(name, quote=False) in inner
    assert "\n" not in out.subject and "\r" not in out.subject
