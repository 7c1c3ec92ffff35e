"""The logic-less renderer, called directly: parsing, injection, escaping, values, billing units."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2

from services.template import render as r
from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb


def decl(name: str, *, required: bool = False, default: str = "") -> r.VariableDecl:
    path = r.parse_path(name)
    assert path is not None
    return r.VariableDecl(name, path, pb.VARIABLE_TYPE_STRING, required, default)


def ctx(
    contact: dict[str, Any] | None = None, data: dict[str, Any] | None = None, key: str = "k"
) -> pb.RenderContext:
    c, d = struct_pb2.Struct(), struct_pb2.Struct()
    c.update(contact or {})
    d.update(data or {})
    return pb.RenderContext(key=key, contact=c, data=d)


def compile_sms(text: str, *decls: r.VariableDecl) -> r.CompiledTemplate:
    return r.compile_template(
        channel=common.CHANNEL_SMS,
        message_type=common.MESSAGE_TYPE_MESSAGE,
        content=pb.TemplateContent(sms=pb.SmsContent(text=text)),
        variables=list(decls),
    )


# --- parsing ---------------------------------------------------------------------------------


def test_parse_splits_literals_and_references() -> None:
    parts = r.parse("Hi {{contact.first_name}}, {{  data.order.id  }}!")
    assert parts == (
        "Hi ",
        r.Ref("contact.first_name", ("contact", "first_name")),
        ", ",
        r.Ref("data.order.id", ("data", "order", "id")),
        "!",
    )
    assert r.literal_length(parts) == 6


@pytest.mark.parametrize(
    "source",
    [
        "{{ __class__ }}",
        "{{ contact.__class__ }}",
        "{{ contact.__init__.__globals__ }}",
        "{{ self }}",
        "{{ first_name }}",
        "{{ contact }}",
        "{{ contact.first_name | upper }}",
        "{{ contact.first_name() }}",
        "{{ contact['first_name'] }}",
        "{{ data.items[0] }}",
        "{{ data.x + 1 }}",
        "{{ 7*7 }}",
        "{{ ''.join(x) }}",
        "{{ Contact.Name }}",
        "{{ contact.first-name }}",
        "{{ contact..x }}",
        "{{ contact.1st }}",
        "{{ }}",
        "{{ contact.x",
        "{{{ contact.x }}}",
        "{{ data.a.b.c.d.e.f.g.h }}",
    ],
)
def test_anything_but_a_dotted_path_is_a_syntax_error(source: str) -> None:
    with pytest.raises(r.TemplateSyntaxError):
        r.parse(source)


@pytest.mark.parametrize(
    "source",
    [
        "{% for x in contact %}{% endfor %}",
        "{0.__class__}",
        "{contact.first_name}",
        "%(name)s %s",
        "${contact.first_name}",
        "<%= 7*7 %>",
        "{ {contact.x} }",
        "}} {",
    ],
)
def test_other_template_syntaxes_are_literal_text(source: str) -> None:
    assert r.parse(source) == (source,)
    rendered = r.render(compile_sms(source), ctx({"first_name": "Ann"}))
    assert (rendered.error, rendered.text) == ("", source)


def test_values_are_inserted_as_text_and_never_parsed_again() -> None:
    t = compile_sms("A {{ data.v }} B", decl("data.v"))
    for value in ("{{ contact.secret }}", "{0.__class__}", "{% debug %}", "%s%s%n", "__import__('os')"):
        assert r.render(t, ctx({"secret": "S"}, {"v": value})).text == f"A {value} B"


def test_lookup_is_by_key_only() -> None:
    context = ctx({"first_name": "Ann", "nested": {"a": {"b": "deep"}}, "list": [1, 2]}, {"n": 3})
    assert r.lookup(context, ("contact", "first_name")) == "Ann"
    assert r.lookup(context, ("contact", "nested", "a", "b")) == "deep"
    assert r.lookup(context, ("contact", "nested", "a")) is None  # an object is not text
    assert r.lookup(context, ("contact", "list")) is None
    assert r.lookup(context, ("contact", "first_name", "upper")) is None
    assert r.lookup(context, ("contact", "missing")) is None
    assert r.lookup(context, ("data", "n")) == "3"
    # Looking up did not add keys to the recipient's maps.
    assert "missing" not in context.contact.fields


# --- values ----------------------------------------------------------------------------------


def test_scalars_format() -> None:
    t = compile_sms(
        "{{ data.i }} {{ data.f }} {{ data.big }} {{ data.t }} {{ data.b }} {{ data.s }}",
        *(decl(f"data.{n}") for n in ("i", "f", "big", "t", "b", "s")),
    )
    out = r.render(t, ctx(data={"i": 42, "f": 7.25, "big": 1e20, "t": True, "b": False, "s": ""}))
    assert out.text == "42 7.25 1e+20 true false "


def test_missing_required_is_an_error_not_an_empty_string() -> None:
    t = compile_sms(
        "Hi {{ contact.first_name }} {{ data.code }}",
        decl("contact.first_name", required=True),
        decl("data.code", required=True),
    )
    out = r.render(t, ctx({"first_name": None}, key="e1"))
    assert out.key == "e1"
    assert out.error == "missing required variables contact.first_name, data.code"
    assert out.text == ""
    assert out.billing_unit == common.BILLING_UNIT_UNSPECIFIED
    # An explicitly empty string is a value.
    assert r.render(t, ctx({"first_name": ""}, {"code": "X"})).text == "Hi  X"


def test_optional_falls_back_to_default() -> None:
    t = compile_sms(
        "Hi {{ contact.first_name }}{{ data.suffix }}",
        decl("contact.first_name", default="there"),
        decl("data.suffix"),
    )
    assert r.render(t, ctx()).text == "Hi there"
    assert r.render(t, ctx({"first_name": "Ann"}, {"suffix": "!"})).text == "Hi Ann!"


def test_sample_mode_shows_placeholders() -> None:
    t = compile_sms("Hi {{ contact.first_name }}", decl("contact.first_name", required=True))
    assert r.render(t, ctx(), sample=True).text == "Hi [contact.first_name]"


def test_undeclared_reference_cannot_compile() -> None:
    with pytest.raises(r.TemplateSyntaxError, match="not declared"):
        compile_sms("{{ data.x }}")


def test_unicode_round_trips() -> None:
    t = compile_sms("{{ contact.name }} 👋", decl("contact.name"))
    out = r.render(t, ctx({"name": "山田 Zoë"}))
    assert out.text == "山田 Zoë 👋"
    assert (out.billing_unit, out.units) == (common.BILLING_UNIT_SMS_SEGMENT, 1)


# --- SMS -------------------------------------------------------------------------------------


def test_sms_units_are_segments() -> None:
    t = compile_sms("{{ data.body }}", decl("data.body", required=True))
    assert r.render(t, ctx(data={"body": "a" * 161})).units == 2
    assert r.render(t, ctx(data={"body": "ж" * 71})).units == 2
    assert r.render(t, ctx(data={"body": "€" * 81})).units == 2
    assert "longer than 1600" in r.render(t, ctx(data={"body": "a" * 1601})).error
    assert r.render(t, ctx(data={"body": ""})).error == "text: rendered empty"


# --- EMAIL -----------------------------------------------------------------------------------


def compile_email(
    subject: str,
    html: str,
    text: str = "",
    *decls: r.VariableDecl,
    message_type: int = common.MESSAGE_TYPE_MESSAGE,
) -> r.CompiledTemplate:
    return r.compile_template(
        channel=common.CHANNEL_EMAIL,
        message_type=message_type,
        content=pb.TemplateContent(email=pb.EmailContent(subject=subject, html=html, text=text)),
        variables=list(decls),
        unsubscribe_url="https://example.com/unsubscribe/{{contact.id}}",
    )


def test_email_html_is_escaped_text_and_subject_are_not() -> None:
    t = compile_email(
        "For {{ contact.name }}",
        '<a href="https://x.example/?q={{ contact.name }}">{{ contact.name }}</a>',
        "Plain {{ contact.name }}",
        decl("contact.name"),
    )
    evil = "\"><script>alert('x')</script>&"
    out = r.render(t, ctx({"name": evil}))
    assert out.html == (
        '<a href="https://x.example/?q=&quot;&gt;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;">'
        "&quot;&gt;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;</a>"
    )
    assert out.text == f"Plain {evil}"
    assert out.subject == f"For {evil}"
    assert (out.billing_unit, out.units) == (common.BILLING_UNIT_EMAIL, 1)
    assert dict(out.headers) == {}


def test_subject_cannot_carry_header_injection() -> None:
    t = compile_email("Hi {{ contact.name }}", "<p>x</p>", "", decl("contact.name"))
    out = r.render(t, ctx({"name": "Ann\r\nBcc: all@example.com"}))
    assert out.subject == "Hi Ann  Bcc: all@example.com"


def test_text_derived_from_html() -> None:
    html = (
        "<html><head><title>T</title><style>p { color: red }</style></head><body>"
        "<!-- hidden --><script>var x = '{{ nope }}';</script>"
        "<h1>Hello&nbsp;{{ contact.name }}</h1><p>Line&amp;one</p>\n\n  <p>Two <b>bold</b>"
        '<a href="{{ data.url }}">link</a></p></body></html>'
    )
    parts = r.html_to_text(r.parse(html.replace("{{ nope }}", "")))
    t = r.Text(parts)
    assert t.render({"contact.name": "<Ann>", "data.url": "x"}) == "Hello <Ann> Line&one Two boldlink"
    assert r.strip_tags("<p>a</p><p>b &lt; c</p>") == "a b < c"


def test_newsletter_gets_list_unsubscribe() -> None:
    t = compile_email("s", "<p>x</p>", "", message_type=common.MESSAGE_TYPE_NEWSLETTER)
    out = r.render(t, ctx({"id": "c_1 2/3"}))
    assert out.headers["List-Unsubscribe"] == "<https://example.com/unsubscribe/c_1%202%2F3>"
    assert out.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "contact.id" in r.render(t, ctx()).error
    assert r.render(t, ctx(), sample=True).headers["List-Unsubscribe"].endswith("/preview>")


# --- RCS -------------------------------------------------------------------------------------


def compile_rcs(content: pb.RcsContent, *decls: r.VariableDecl) -> r.CompiledTemplate:
    return r.compile_template(
        channel=common.CHANNEL_RCS,
        message_type=common.MESSAGE_TYPE_MESSAGE,
        content=pb.TemplateContent(rcs=content),
        variables=list(decls),
    )


@pytest.mark.parametrize(
    ("content", "unit"),
    [
        (pb.RcsContent(text="x" * 160), common.BILLING_UNIT_RCS_BASIC),
        (pb.RcsContent(text="x" * 161), common.BILLING_UNIT_RCS_SINGLE),
        (pb.RcsContent(text="hi", suggestions=[pb.Suggestion(text="Yes")]), common.BILLING_UNIT_RCS_SINGLE),
        (pb.RcsContent(rich_card=pb.RichCard(title="Card")), common.BILLING_UNIT_RCS_SINGLE),
        (
            pb.RcsContent(carousel=[pb.RichCard(title="a"), pb.RichCard(title="b")]),
            common.BILLING_UNIT_RCS_SINGLE,
        ),
    ],
)
def test_rcs_billing_unit(content: pb.RcsContent, unit: int) -> None:
    out = r.render(compile_rcs(content), ctx())
    assert (out.error, out.billing_unit, out.units) == ("", unit, 1)


def test_rcs_basic_counts_rendered_length() -> None:
    t = compile_rcs(pb.RcsContent(text="{{ data.t }}"), decl("data.t"))
    assert r.render(t, ctx(data={"t": "y" * 160})).billing_unit == common.BILLING_UNIT_RCS_BASIC
    assert r.render(t, ctx(data={"t": "y" * 161})).billing_unit == common.BILLING_UNIT_RCS_SINGLE


def test_rcs_rendered_limits() -> None:
    t = compile_rcs(
        pb.RcsContent(
            rich_card=pb.RichCard(
                title="{{ data.title }}",
                media_url="{{ data.media }}",
                suggestions=[pb.Suggestion(text="{{ data.label }}")],
            )
        ),
        decl("data.title"),
        decl("data.media"),
        decl("data.label", default="ok"),
    )
    ok = r.render(t, ctx(data={"title": "T", "media": "https://cdn.example/a.png"}))
    assert ok.error == ""
    assert ok.rich_card.suggestions[0].text == "ok"
    assert "title" in r.render(t, ctx(data={"title": "t" * 201})).error
    assert "https" in r.render(t, ctx(data={"title": "t", "media": "javascript:alert(1)"})).error
    assert "25" in r.render(t, ctx(data={"title": "t", "label": "l" * 26})).error
