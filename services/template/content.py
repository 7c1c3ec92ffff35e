"""Save-time validation: what a channel can carry, declared variables, template syntax.

Every problem is collected (not just the first) and reported as a field violation naming the
proto field path and, for limits, the limit, e.g. `content.sms.text: longer than 1600
characters`. Fields that reference variables are measured by their literal text only (the
rendered length is checked again per recipient), so a short value is never refused up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from services.template import render as r
from shoal.errors import FieldViolation, InvalidArgument
from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb

NAME_MAX = 200
VARIABLES_MAX = 100
DEFAULT_MAX = 1000

CHANNELS: dict[int, str] = {
    common.CHANNEL_EMAIL: "EMAIL",
    common.CHANNEL_SMS: "SMS",
    common.CHANNEL_RCS: "RCS",
}
MESSAGE_TYPES: dict[int, str] = {
    common.MESSAGE_TYPE_MESSAGE: "MESSAGE",
    common.MESSAGE_TYPE_CONVERSATION: "CONVERSATION",
    common.MESSAGE_TYPE_NEWSLETTER: "NEWSLETTER",
}
_CONTENT_FIELD: dict[int, str] = {
    common.CHANNEL_EMAIL: "email",
    common.CHANNEL_SMS: "sms",
    common.CHANNEL_RCS: "rcs",
}


class _Problems:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_name: str, description: str) -> None:
        self.items.append(FieldViolation(field_name, description))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        first = self.items[0]
        more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
        raise InvalidArgument(f"{first.field}: {first.description}{more}", violations=self.items)


def check_name(name: str, problems: _Problems) -> None:
    if not name.strip():
        problems.add("name", "is required")
    elif len(name) > NAME_MAX:
        problems.add("name", f"longer than {NAME_MAX} characters")


def check_channel(channel: int, message_type: int, problems: _Problems) -> None:
    if channel not in CHANNELS:
        problems.add("channel", "is required: one of EMAIL, SMS, RCS")
    if message_type not in MESSAGE_TYPES:
        problems.add("message_type", "is required: one of MESSAGE, CONVERSATION, NEWSLETTER")


def _check_default(var: pb.Variable, where: str, problems: _Problems) -> None:
    value = var.default_value
    if not value:
        return
    if len(value) > DEFAULT_MAX:
        problems.add(f"{where}.default_value", f"longer than {DEFAULT_MAX} characters")
    elif var.type == pb.VARIABLE_TYPE_NUMBER:
        try:
            float(value)
        except ValueError:
            problems.add(f"{where}.default_value", "is not a number")
    elif var.type == pb.VARIABLE_TYPE_BOOLEAN and value not in ("true", "false"):
        problems.add(f"{where}.default_value", "must be 'true' or 'false'")
    elif var.type == pb.VARIABLE_TYPE_TIMESTAMP:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            problems.add(f"{where}.default_value", "is not an RFC 3339 timestamp")


def check_variables(variables: Sequence[pb.Variable], problems: _Problems) -> list[r.VariableDecl]:
    if len(variables) > VARIABLES_MAX:
        problems.add("variables", f"more than {VARIABLES_MAX} variables")
    decls: list[r.VariableDecl] = []
    seen: set[str] = set()
    for i, var in enumerate(variables):
        where = f"variables[{i}]"
        path = r.parse_path(var.name)
        if path is None:
            problems.add(
                f"{where}.name",
                f"{var.name!r} is not a variable name: contact.<name> or data.<name>[.<name>...], "
                "lower-case letters, digits and '_'",
            )
            continue
        if var.name in seen:
            problems.add(f"{where}.name", f"{var.name!r} is declared twice")
            continue
        seen.add(var.name)
        if var.type not in pb.VariableType.values():
            problems.add(f"{where}.type", "unknown type")
        if var.required and var.default_value:
            problems.add(f"{where}.default_value", "a required variable has no default")
        _check_default(var, where, problems)
        decls.append(
            r.VariableDecl(
                var.name, path, var.type or pb.VARIABLE_TYPE_STRING, var.required, var.default_value
            )
        )
    return decls


class _FieldChecker:
    """Parses each text field once, checks its references and literal length."""

    def __init__(self, declared: set[str], problems: _Problems) -> None:
        self.declared = declared
        self.problems = problems

    def text(self, where: str, source: str, limit: int, *, required: bool = False) -> tuple[r.Part, ...]:
        if required and not source.strip():
            self.problems.add(where, "is required")
            return ()
        try:
            parts = r.parse(source)
        except r.TemplateSyntaxError as exc:
            self.problems.add(where, str(exc))
            return ()
        for ref in r.references(parts):
            if ref.name not in self.declared:
                self.problems.add(where, f"variable {ref.name!r} is not declared in variables")
        if r.literal_length(parts) > limit:
            self.problems.add(where, f"longer than {limit} characters")
        return parts

    def url(self, where: str, source: str, schemes: tuple[str, ...], label: str) -> None:
        parts = self.text(where, source, r.RCS_POSTBACK_MAX)
        if parts and not (isinstance(parts[0], str) and parts[0].startswith(schemes)):
            self.problems.add(where, f"must be {label} URL")


def _check_email(content: pb.EmailContent, check: _FieldChecker) -> None:
    subject = check.text("content.email.subject", content.subject, r.EMAIL_SUBJECT_MAX, required=True)
    if any(isinstance(p, str) and ("\r" in p or "\n" in p) for p in subject):
        check.problems.add("content.email.subject", "must be one line")
    check.text("content.email.html", content.html, r.EMAIL_BODY_MAX)
    check.text("content.email.text", content.text, r.EMAIL_BODY_MAX)
    if not content.html.strip() and not content.text.strip():
        check.problems.add("content.email.html", "html or text is required")


def _check_suggestions(where: str, items: Sequence[pb.Suggestion], limit: int, check: _FieldChecker) -> None:
    if len(items) > limit:
        check.problems.add(where, f"more than {limit} suggestions")
    for i, s in enumerate(items):
        at = f"{where}[{i}]"
        check.text(f"{at}.text", s.text, r.RCS_SUGGESTION_TEXT_MAX, required=True)
        check.text(f"{at}.postback", s.postback, r.RCS_POSTBACK_MAX)
        if s.url:
            check.url(f"{at}.url", s.url, ("https://", "http://"), "an http or https")


def _check_card(where: str, card: pb.RichCard, check: _FieldChecker) -> None:
    check.text(f"{where}.title", card.title, r.RCS_TITLE_MAX)
    check.text(f"{where}.description", card.description, r.RCS_DESCRIPTION_MAX)
    if card.media_url:
        check.url(f"{where}.media_url", card.media_url, ("https://",), "an https")
    if not (card.title or card.description or card.media_url):
        check.problems.add(where, "needs a title, a description or a media_url")
    _check_suggestions(f"{where}.suggestions", card.suggestions, r.RCS_CARD_SUGGESTIONS_MAX, check)


def _check_rcs(content: pb.RcsContent, check: _FieldChecker) -> None:
    check.text("content.rcs.text", content.text, r.RCS_TEXT_MAX)
    _check_suggestions("content.rcs.suggestions", content.suggestions, r.RCS_SUGGESTIONS_MAX, check)
    has_card = content.HasField("rich_card")
    if has_card:
        _check_card("content.rcs.rich_card", content.rich_card, check)
    if content.carousel:
        if has_card:
            check.problems.add("content.rcs.carousel", "a message has a rich_card or a carousel, not both")
        n = len(content.carousel)
        if n < r.RCS_CAROUSEL_MIN or n > r.RCS_CAROUSEL_MAX:
            check.problems.add(
                "content.rcs.carousel",
                f"has {n} cards; a carousel has {r.RCS_CAROUSEL_MIN} to {r.RCS_CAROUSEL_MAX}",
            )
        for i, card in enumerate(content.carousel):
            _check_card(f"content.rcs.carousel[{i}]", card, check)
    if not content.text.strip() and not has_card and not content.carousel:
        check.problems.add("content.rcs.text", "text, rich_card or carousel is required")


def validate_version(
    *,
    channel: int,
    content: pb.TemplateContent,
    variables: Sequence[pb.Variable],
    name: str | None = None,
    message_type: int | None = None,
) -> list[r.VariableDecl]:
    """Check a version about to be saved; raise InvalidArgument with every violation."""
    problems = _Problems()
    if name is not None:
        check_name(name, problems)
    if message_type is not None:
        check_channel(channel, message_type, problems)
    decls = check_variables(variables, problems)
    expected = _CONTENT_FIELD.get(channel)
    kind = content.WhichOneof("channel_content")
    if expected is not None:
        if kind is None:
            problems.add(f"content.{expected}", "is required")
        elif kind != expected:
            problems.add(
                f"content.{kind}",
                f"a {CHANNELS[channel]} template carries content.{expected}, not content.{kind}",
            )
        else:
            check = _FieldChecker({d.name for d in decls}, problems)
            if kind == "email":
                _check_email(content.email, check)
            elif kind == "sms":
                check.text("content.sms.text", content.sms.text, r.SMS_TEXT_MAX, required=True)
            else:
                _check_rcs(content.rcs, check)
    problems.raise_if_any()
    return decls
