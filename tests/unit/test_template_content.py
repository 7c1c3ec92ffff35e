"""Save-time validation of template content, variables and syntax, called directly."""

from __future__ import annotations

import pytest

from services.template.content import validate_version
from shoal.errors import InvalidArgument
from shoal.v1 import common_pb2 as common
from shoal.v1 import template_pb2 as pb

SMS, EMAIL, RCS = common.CHANNEL_SMS, common.CHANNEL_EMAIL, common.CHANNEL_RCS


def problems(
    channel: int, content: pb.TemplateContent, variables: list[pb.Variable] | None = None
) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_version(channel=channel, content=content, variables=variables or [])
    return {v.field: v.description for v in caught.value.violations}


def sms(text: str) -> pb.TemplateContent:
    return pb.TemplateContent(sms=pb.SmsContent(text=text))


def test_limits_name_field_and_limit() -> None:
    assert problems(SMS, sms("x" * 1601)) == {"content.sms.text": "longer than 1600 characters"}


def test_references_count_only_their_literal_text() -> None:
    # The rendered length is checked per recipient; the template itself is not too long.
    decls = validate_version(
        channel=SMS,
        content=sms("x" * 1590 + "{{ data.long_variable_name }}"),
        variables=[pb.Variable(name="data.long_variable_name")],
    )
    assert [d.name for d in decls] == ["data.long_variable_name"]
    validate_version(
        channel=RCS,
        content=pb.TemplateContent(
            rcs=pb.RcsContent(suggestions=[pb.Suggestion(text="{{ data.a_long_label }}")], text="t")
        ),
        variables=[pb.Variable(name="data.a_long_label")],
    )


def test_every_problem_is_reported() -> None:
    found = problems(
        RCS,
        pb.TemplateContent(
            rcs=pb.RcsContent(
                text="{{ data.x }}",
                suggestions=[pb.Suggestion(text=""), pb.Suggestion(text="ok", url="ftp://x")],
                rich_card=pb.RichCard(),
                carousel=[pb.RichCard(title="a"), pb.RichCard(title="b")],
            )
        ),
    )
    assert found == {
        "content.rcs.text": "variable 'data.x' is not declared in variables",
        "content.rcs.suggestions[0].text": "is required",
        "content.rcs.suggestions[1].url": "must be an http or https URL",
        "content.rcs.rich_card": "needs a title, a description or a media_url",
        "content.rcs.carousel": "a message has a rich_card or a carousel, not both",
    }


def test_card_suggestions_are_capped_at_four() -> None:
    card = pb.RichCard(title="t", suggestions=[pb.Suggestion(text="s")] * 5)
    assert problems(RCS, pb.TemplateContent(rcs=pb.RcsContent(rich_card=card))) == {
        "content.rcs.rich_card.suggestions": "more than 4 suggestions"
    }


def test_media_url_with_a_variable_must_still_start_https() -> None:
    card = pb.RichCard(title="t", media_url="{{ data.url }}")
    found = problems(
        RCS, pb.TemplateContent(rcs=pb.RcsContent(rich_card=card)), [pb.Variable(name="data.url")]
    )
    assert found == {"content.rcs.rich_card.media_url": "must be an https URL"}


def test_content_must_match_channel() -> None:
    assert problems(EMAIL, sms("x")) == {
        "content.sms": "a EMAIL template carries content.email, not content.sms"
    }
    assert problems(SMS, pb.TemplateContent()) == {"content.sms": "is required"}


@pytest.mark.parametrize(
    ("variable", "field", "words"),
    [
        (pb.Variable(name="contact"), "variables[0].name", "not a variable name"),
        (pb.Variable(name="user.name"), "variables[0].name", "not a variable name"),
        (pb.Variable(name="contact.__class__"), "variables[0].name", "not a variable name"),
        (
            pb.Variable(name="data.n", type=pb.VARIABLE_TYPE_NUMBER, default_value="x"),
            "variables[0].default_value",
            "number",
        ),
        (
            pb.Variable(name="data.b", type=pb.VARIABLE_TYPE_BOOLEAN, default_value="yes"),
            "variables[0].default_value",
            "'true'",
        ),
        (
            pb.Variable(name="data.t", type=pb.VARIABLE_TYPE_TIMESTAMP, default_value="soon"),
            "variables[0].default_value",
            "RFC 3339",
        ),
        (
            pb.Variable(name="data.r", required=True, default_value="d"),
            "variables[0].default_value",
            "required",
        ),
        (pb.Variable(name="data.u", type=99), "variables[0].type", "unknown"),
    ],
)
def test_variable_declarations(variable: pb.Variable, field: str, words: str) -> None:
    found = problems(SMS, sms("hi"), [variable])
    assert words in found[field]


def test_valid_typed_defaults_pass() -> None:
    decls = validate_version(
        channel=SMS,
        content=sms("{{ data.n }} {{ data.b }} {{ data.t }}"),
        variables=[
            pb.Variable(name="data.n", type=pb.VARIABLE_TYPE_NUMBER, default_value="1.5"),
            pb.Variable(name="data.b", type=pb.VARIABLE_TYPE_BOOLEAN, default_value="true"),
            pb.Variable(
                name="data.t", type=pb.VARIABLE_TYPE_TIMESTAMP, default_value="2026-01-01T00:00:00+00:00"
            ),
        ],
    )
    assert [d.default for d in decls] == ["1.5", "true", "2026-01-01T00:00:00+00:00"]


def test_the_error_message_names_the_first_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_version(channel=SMS, content=sms("{{ __class__ }}"), variables=[], name="", message_type=0)
    assert str(caught.value).startswith("name: is required (and 2 more)")
