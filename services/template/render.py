"""Logic-less rendering: `{{ contact.x }}` / `{{ data.y.z }}` substitution and nothing else.

The grammar is deliberately tiny so there is nothing to exploit: between `{{` and `}}` only a
dotted path of lower-case identifiers under the roots `contact` or `data` is accepted; anything
else between double braces is a syntax error reported when the template is saved, and every
other character (`{% %}`, `{0.__class__}`, single braces) is literal text. Values are looked up
in the recipient's protobuf Structs by key, never by attribute, and are inserted as text: they
are never parsed again, so a value that looks like a template stays a string.

Templates are compiled once per immutable version (`compile_template`) and rendered per
recipient (`render`) straight into `RenderedMessage`, because RenderBatch runs tens of
thousands of recipients per call and a second conversion layer would cost as much as rendering.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import quote

from google.protobuf import struct_pb2

from services.template import sms
from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb

ROOTS = ("contact", "data")
MAX_PATH_DEPTH = 8
_SEGMENT = re.compile(r"[a-z_][a-z0-9_]*")
_OPEN, _CLOSE = "{{", "}}"

# Channel limits, shared by save-time validation (content.py) and render-time checks.
EMAIL_SUBJECT_MAX = 998  # RFC 5322 line length
EMAIL_BODY_MAX = 500_000
SMS_TEXT_MAX = 1600  # 10 concatenated GSM-7 parts; carriers refuse longer
RCS_TEXT_MAX = 3072
RCS_SUGGESTIONS_MAX = 11
RCS_CARD_SUGGESTIONS_MAX = 4
RCS_SUGGESTION_TEXT_MAX = 25
RCS_POSTBACK_MAX = 2048
RCS_TITLE_MAX = 200
RCS_DESCRIPTION_MAX = 2000
RCS_CAROUSEL_MIN, RCS_CAROUSEL_MAX = 2, 10
RCS_BASIC_TEXT_MAX = 160


class TemplateSyntaxError(ValueError):
    """A `{{ ... }}` that is not a variable reference; the message quotes it."""


@dataclass(frozen=True, slots=True)
class Ref:
    """One `{{ root.a.b }}` reference."""

    name: str
    path: tuple[str, ...]


Part = str | Ref


def parse_path(name: str) -> tuple[str, ...] | None:
    """The path of a valid variable name (`contact.first_name`), or None."""
    path = tuple(name.split("."))
    if len(path) < 2 or len(path) > MAX_PATH_DEPTH or path[0] not in ROOTS:
        return None
    for segment in path[1:]:
        # Dunder names are refused outright: harmless here (lookups are by key), but they are
        # only ever written by someone probing for attribute access.
        if not _SEGMENT.fullmatch(segment) or segment.startswith("__"):
            return None
    return path


def _quote_snippet(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse(source: str) -> tuple[Part, ...]:
    """Split `source` into literal strings and references; raise TemplateSyntaxError."""
    parts: list[Part] = []
    pos = 0
    while True:
        start = source.find(_OPEN, pos)
        if start < 0:
            if pos < len(source):
                parts.append(source[pos:])
            return tuple(parts)
        end = source.find(_CLOSE, start + 2)
        if end < 0:
            raise TemplateSyntaxError(
                f"'{{{{' at offset {start} is never closed with '}}}}' "
                f"(near {_quote_snippet(source[start : start + 40])})"
            )
        inner = source[start + 2 : end].strip()
        path = parse_path(inner)
        if path is None:
            raise TemplateSyntaxError(
                f"{_quote_snippet('{{' + source[start + 2 : end] + '}}')} is not a variable reference: "
                "use {{ contact.name }} or {{ data.name }} (lower-case letters, digits, '_'; no "
                "expressions, filters or indexing)"
            )
        if start > pos:
            parts.append(source[pos:start])
        parts.append(Ref(".".join(path), path))
        pos = end + 2


def references(parts: Sequence[Part]) -> list[Ref]:
    return [p for p in parts if isinstance(p, Ref)]


def literal_length(parts: Sequence[Part]) -> int:
    """Characters the template has whatever the values: a lower bound of the rendered length."""
    return sum(len(p) for p in parts if isinstance(p, str))


# --- text derived from html -------------------------------------------------------------------

_SENTINEL = "\x00"
_DROP_BLOCKS = re.compile(r"<!--.*?-->|<(script|style|head|title)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_BLOCK_TAGS = re.compile(r"</?(p|br|div|li|ul|ol|tr|td|th|table|h[1-6]|hr|blockquote)\b[^>]*>", re.I)
_TAGS = re.compile(r"<[^>]*>")
_WHITESPACE = re.compile(r"\s+")
_SENTINEL_SPLIT = re.compile(_SENTINEL + r"(\d+)" + _SENTINEL)


def html_to_text(parts: Sequence[Part]) -> tuple[Part, ...]:
    """Plain text of an html template: tags stripped, entities unescaped, whitespace collapsed.

    Works on the parsed template (references replaced by sentinels meanwhile) so the text is
    derived once per version, and values are never run through the tag stripper.
    """
    refs: list[Ref] = []
    chunks: list[str] = []
    for part in parts:
        if isinstance(part, Ref):
            chunks.append(f"{_SENTINEL}{len(refs)}{_SENTINEL}")
            refs.append(part)
        else:
            chunks.append(part.replace(_SENTINEL, ""))
    text = _DROP_BLOCKS.sub(" ", "".join(chunks))
    text = _BLOCK_TAGS.sub(" ", text)
    text = _TAGS.sub("", text)
    # html.unescape never yields NUL (it maps &#0; to U+FFFD), so sentinels survive it intact.
    text = _WHITESPACE.sub(" ", html.unescape(text)).strip()
    out: list[Part] = []
    for i, piece in enumerate(_SENTINEL_SPLIT.split(text)):
        if i % 2:
            out.append(refs[int(piece)])
        elif piece:
            out.append(piece)
    return tuple(out)


def strip_tags(source: str) -> str:
    """Plain text of literal html (no references)."""
    return "".join(p for p in html_to_text((source,)) if isinstance(p, str))


# --- compiled templates ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VariableDecl:
    name: str
    path: tuple[str, ...]
    type: int
    required: bool
    default: str


class Text:
    """A compiled text field: literal pieces with the reference slots filled per recipient."""

    __slots__ = ("_literal", "_pieces", "_slots", "parts")

    def __init__(self, parts: tuple[Part, ...] = ()) -> None:
        self.parts = parts
        self._pieces = tuple(p if isinstance(p, str) else "" for p in parts)
        self._slots = tuple((i, p.name) for i, p in enumerate(parts) if isinstance(p, Ref))
        self._literal = "".join(self._pieces)

    @classmethod
    def of(cls, source: str) -> Text:
        return cls(parse(source))

    def render(self, values: Mapping[str, str]) -> str:
        if not self._slots:
            return self._literal
        pieces = list(self._pieces)
        for i, name in self._slots:
            pieces[i] = values[name]
        return "".join(pieces)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Text) and other.parts == self.parts

    def __hash__(self) -> int:
        return hash(self.parts)

    def __repr__(self) -> str:
        return f"Text({self.parts!r})"

    def __bool__(self) -> bool:
        return bool(self.parts)


@dataclass(frozen=True, slots=True)
class CompiledSuggestion:
    text: Text
    postback: Text
    url: Text


@dataclass(frozen=True, slots=True)
class CompiledCard:
    title: Text
    description: Text
    media_url: Text
    suggestions: tuple[CompiledSuggestion, ...]


@dataclass(frozen=True)
class CompiledTemplate:
    """One immutable version, ready to render."""

    channel: int
    message_type: int
    variables: tuple[VariableDecl, ...]
    subject: Text = field(default_factory=Text)
    html: Text = field(default_factory=Text)
    text: Text = field(default_factory=Text)
    suggestions: tuple[CompiledSuggestion, ...] = ()
    rich_card: CompiledCard | None = None
    carousel: tuple[CompiledCard, ...] = ()
    # EMAIL NEWSLETTER only: the List-Unsubscribe URL (may reference contact.id).
    unsubscribe_url: Text | None = None


def _suggestion(s: pb.Suggestion) -> CompiledSuggestion:
    return CompiledSuggestion(Text.of(s.text), Text.of(s.postback), Text.of(s.url))


def _card(c: pb.RichCard) -> CompiledCard:
    return CompiledCard(
        Text.of(c.title),
        Text.of(c.description),
        Text.of(c.media_url),
        tuple(_suggestion(s) for s in c.suggestions),
    )


def compile_template(
    *,
    channel: int,
    message_type: int,
    content: pb.TemplateContent,
    variables: Sequence[VariableDecl],
    unsubscribe_url: str = "",
) -> CompiledTemplate:
    """Compile a saved (already validated) version; raises TemplateSyntaxError otherwise."""
    kind = content.WhichOneof("channel_content")
    if channel == common.CHANNEL_EMAIL and kind == "email":
        html_parts = Text.of(content.email.html)
        text = Text.of(content.email.text) if content.email.text else Text(html_to_text(html_parts.parts))
        unsubscribe = (
            Text.of(unsubscribe_url)
            if message_type == common.MESSAGE_TYPE_NEWSLETTER and unsubscribe_url
            else None
        )
        compiled = CompiledTemplate(
            channel,
            message_type,
            (),
            subject=Text.of(content.email.subject),
            html=html_parts,
            text=text,
            unsubscribe_url=unsubscribe,
        )
    elif channel == common.CHANNEL_SMS and kind == "sms":
        compiled = CompiledTemplate(channel, message_type, (), text=Text.of(content.sms.text))
    elif channel == common.CHANNEL_RCS and kind == "rcs":
        rcs = content.rcs
        compiled = CompiledTemplate(
            channel,
            message_type,
            (),
            text=Text.of(rcs.text),
            suggestions=tuple(_suggestion(s) for s in rcs.suggestions),
            rich_card=_card(rcs.rich_card) if rcs.HasField("rich_card") else None,
            carousel=tuple(_card(c) for c in rcs.carousel),
        )
    else:
        raise TemplateSyntaxError(f"content {kind!r} does not match channel {channel}")
    declared = {v.name: v for v in variables}
    used: dict[str, VariableDecl] = {}
    for ref in _all_refs(compiled):
        if ref.name not in declared:
            raise TemplateSyntaxError(f"variable {ref.name!r} is not declared")
        used[ref.name] = declared[ref.name]
    # Only what the content references is resolved per recipient.
    return replace(compiled, variables=tuple(used.values()))


def _all_refs(t: CompiledTemplate) -> list[Ref]:
    texts: list[Text] = [t.subject, t.html, t.text]
    for s in t.suggestions:
        texts.extend((s.text, s.postback, s.url))
    for card in [*([t.rich_card] if t.rich_card else []), *t.carousel]:
        texts.extend((card.title, card.description, card.media_url))
        for s in card.suggestions:
            texts.extend((s.text, s.postback, s.url))
    return [r for text in texts for r in references(text.parts)]


# --- rendering ---------------------------------------------------------------------------------


def _scalar(value: struct_pb2.Value) -> str | None:
    text = value.string_value
    if text:
        # The common case, without asking which kind it is (a non-empty string can only be one).
        return text
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        n = value.number_value
        # Struct numbers are doubles: 42 must read "42", not "42.0".
        if n.is_integer() and abs(n) < 1e15:
            return str(int(n))
        return repr(n)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    # null, objects and lists are not something a text can show: treated as absent.
    return None


def _walk(value: struct_pb2.Value | None, rest: tuple[str, ...]) -> str | None:
    for segment in rest:
        if value is None or value.WhichOneof("kind") != "struct_value":
            return None
        value = value.struct_value.fields.get(segment)
    return None if value is None else _scalar(value)


def lookup(context: pb.RenderContext, path: tuple[str, ...]) -> str | None:
    """The recipient's value at `path` (by map key only), or None when absent."""
    root = context.contact if path[0] == "contact" else context.data
    return _walk(root.fields.get(path[1]), path[2:])


class RenderError(Exception):
    """This recipient cannot be rendered; the message goes into RenderedMessage.error."""


def _resolve(template: CompiledTemplate, context: pb.RenderContext, *, sample: bool) -> dict[str, str]:
    values: dict[str, str] = {}
    missing: list[str] = []
    # The hot loop of RenderBatch: map lookups only, the root maps fetched once per recipient.
    contact = data = None
    for var in template.variables:
        if var.path[0] == "contact":
            if contact is None:
                contact = context.contact.fields
            fields = contact
        else:
            if data is None:
                data = context.data.fields
            fields = data
        found = fields.get(var.path[1])
        value = None
        if found is not None:
            value = _scalar(found) if len(var.path) == 2 else _walk(found, var.path[2:])
        if value is None:
            if var.required:
                if not sample:
                    missing.append(var.name)
                    continue
                value = var.default or f"[{var.name}]"
            else:
                value = var.default
        values[var.name] = value
    if missing:
        raise RenderError(
            "missing required variable" + ("s " if len(missing) > 1 else " ") + ", ".join(missing)
        )
    return values


def _check_length(field_name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise RenderError(f"{field_name}: rendered longer than {limit} characters")


def _render_suggestion(where: str, s: CompiledSuggestion, values: Mapping[str, str]) -> pb.Suggestion:
    text = s.text.render(values)
    if not text:
        raise RenderError(f"{where}.text: rendered empty")
    _check_length(f"{where}.text", text, RCS_SUGGESTION_TEXT_MAX)
    postback = s.postback.render(values)
    _check_length(f"{where}.postback", postback, RCS_POSTBACK_MAX)
    url = s.url.render(values)
    if url and not url.startswith(("https://", "http://")):
        raise RenderError(f"{where}.url: must be an http or https URL")
    return pb.Suggestion(text=text, postback=postback, url=url)


def _render_card(where: str, card: CompiledCard, values: Mapping[str, str]) -> pb.RichCard:
    title = card.title.render(values)
    _check_length(f"{where}.title", title, RCS_TITLE_MAX)
    description = card.description.render(values)
    _check_length(f"{where}.description", description, RCS_DESCRIPTION_MAX)
    media_url = card.media_url.render(values)
    if media_url and not media_url.startswith("https://"):
        raise RenderError(f"{where}.media_url: must be an https URL")
    return pb.RichCard(
        title=title,
        description=description,
        media_url=media_url,
        suggestions=[
            _render_suggestion(f"{where}.suggestions[{i}]", s, values) for i, s in enumerate(card.suggestions)
        ],
    )


def _one_line(value: str) -> str:
    # A value with CR/LF in a header would inject headers of its own.
    return value.replace("\r", " ").replace("\n", " ") if ("\r" in value or "\n" in value) else value


def _unsubscribe_headers(
    template: CompiledTemplate, context: pb.RenderContext, *, sample: bool
) -> dict[str, str]:
    url_template = template.unsubscribe_url
    if url_template is None:
        return {}
    values: dict[str, str] = {}
    for ref in references(url_template.parts):
        value = lookup(context, ref.path)
        if value is None:
            if not sample:
                raise RenderError(f"{ref.name} is needed for the List-Unsubscribe header of a newsletter")
            value = "preview"
        values[ref.name] = quote(value, safe="")
    return {
        "List-Unsubscribe": f"<{_one_line(url_template.render(values))}>",
        # RFC 8058 one-click unsubscribe, which large mailbox providers require for bulk mail.
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def render(
    template: CompiledTemplate, context: pb.RenderContext, *, sample: bool = False
) -> pb.RenderedMessage:
    """Render one recipient. Problems become `error` on the message, never an exception.

    `sample` (Preview) fills missing required variables with a visible `[name]` placeholder.
    """
    try:
        return _render(template, context, sample=sample)
    except RenderError as exc:
        return pb.RenderedMessage(key=context.key, error=str(exc))


def flatten_to_sms(message: pb.RenderedMessage) -> pb.RenderedMessage:
    """An RCS message as its SMS fallback: the rich parts become lines of plain text.

    Card titles and descriptions follow the text; a suggestion becomes "text: url" when it opens
    a link (a reply chip is meaningless in SMS, so reply-only suggestions are dropped).
    """
    if message.error:
        return message
    lines = [message.text] if message.text else []
    cards = ([message.rich_card] if message.HasField("rich_card") else []) + list(message.carousel)
    for card in cards:
        lines.extend(part for part in (card.title, card.description) if part)
        lines.extend(f"{s.text}: {s.url}" for s in card.suggestions if s.url)
    lines.extend(f"{s.text}: {s.url}" for s in message.suggestions if s.url)
    text = "\n".join(lines)
    if len(text) > SMS_TEXT_MAX:
        return pb.RenderedMessage(
            key=message.key, error=f"text: SMS fallback longer than {SMS_TEXT_MAX} characters"
        )
    size = sms.measure(text)
    return pb.RenderedMessage(
        key=message.key, text=text, billing_unit=common.BILLING_UNIT_SMS_SEGMENT, units=size.segments
    )


def _render(template: CompiledTemplate, context: pb.RenderContext, *, sample: bool) -> pb.RenderedMessage:
    values = _resolve(template, context, sample=sample)
    channel = template.channel
    if channel == common.CHANNEL_SMS:
        text = template.text.render(values)
        if not text:
            raise RenderError("text: rendered empty")
        _check_length("text", text, SMS_TEXT_MAX)
        size = sms.measure(text)
        return pb.RenderedMessage(
            key=context.key, text=text, billing_unit=common.BILLING_UNIT_SMS_SEGMENT, units=size.segments
        )
    if channel == common.CHANNEL_EMAIL:
        escaped = {k: html.escape(v) for k, v in values.items()} if template.html else values
        subject = _one_line(template.subject.render(values)).strip()
        if not subject:
            raise RenderError("subject: rendered empty")
        _check_length("subject", subject, EMAIL_SUBJECT_MAX)
        message = pb.RenderedMessage(
            key=context.key,
            subject=subject,
            html=template.html.render(escaped),
            text=template.text.render(values),
            billing_unit=common.BILLING_UNIT_EMAIL,
            units=1,
            headers=_unsubscribe_headers(template, context, sample=sample),
        )
        if not message.html and not message.text:
            raise RenderError("html, text: both rendered empty")
        return message
    # RCS
    text = template.text.render(values)
    _check_length("text", text, RCS_TEXT_MAX)
    suggestions = [
        _render_suggestion(f"suggestions[{i}]", s, values) for i, s in enumerate(template.suggestions)
    ]
    card = _render_card("rich_card", template.rich_card, values) if template.rich_card else None
    carousel = [_render_card(f"carousel[{i}]", c, values) for i, c in enumerate(template.carousel)]
    if not text and card is None and not carousel:
        raise RenderError("text: rendered empty")
    plain = not suggestions and card is None and not carousel
    unit = (
        common.BILLING_UNIT_RCS_BASIC
        if plain and len(text) <= RCS_BASIC_TEXT_MAX
        else common.BILLING_UNIT_RCS_SINGLE
    )
    return pb.RenderedMessage(
        key=context.key,
        text=text,
        suggestions=suggestions,
        rich_card=card,
        carousel=carousel,
        billing_unit=unit,
        units=1,
    )
