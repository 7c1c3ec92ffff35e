"""The template catalog: versions, the publish/approve/reject state machine, and the cache of
compiled published versions that RenderBatch renders from.

Version states and the moves between them:
```
DRAFT --publish (EMAIL, SMS)--> PUBLISHED
DRAFT --publish (RCS)--> provider approval: PUBLISHED | REJECTED | PENDING_APPROVAL
PENDING_APPROVAL --publish (operator records the approval)--> PUBLISHED
DRAFT | PENDING_APPROVAL --reject (reason)--> REJECTED
```
PUBLISHED and REJECTED are final: an edit makes a new DRAFT version instead. Because a
PUBLISHED version never changes again, its compiled form is cached for good.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session

from services.template import content as checks
from services.template import render as r
from services.template import repo
from services.template.approval import CHANNELS_NEEDING_APPROVAL, ProviderApproval, Submission, Verdict
from shoal.db import Database
from shoal.errors import FailedPrecondition, InvalidArgument, NotFound
from shoal.v1 import template_pb2 as pb

log = logging.getLogger(__name__)

REASON_MAX = 2000
PAGE_DEFAULT, PAGE_MAX = 50, 200


def state_name(state: int) -> str:
    return pb.TemplateState.Name(state).removeprefix("TEMPLATE_STATE_")


def channel_name(channel: int) -> str:
    return checks.CHANNELS.get(channel, "UNSPECIFIED")


def message_type_name(message_type: int) -> str:
    return checks.MESSAGE_TYPES.get(message_type, "UNSPECIFIED")


def new_template_id() -> str:
    return "tpl_" + uuid.uuid4().hex


def decls_of(variables: Sequence[pb.Variable]) -> list[r.VariableDecl]:
    decls = []
    for v in variables:
        path = r.parse_path(v.name)
        if path is not None:
            decls.append(r.VariableDecl(v.name, path, v.type, v.required, v.default_value))
    return decls


@dataclass(frozen=True)
class Renderable:
    """A resolved, compiled version ready to render."""

    template_id: str
    version: int
    state: int
    compiled: r.CompiledTemplate


@dataclass(frozen=True)
class LaunchCheck:
    node_id: str
    template_id: str
    version: int
    channel: int
    message_type: int


@dataclass(frozen=True)
class LaunchResult:
    problems: list[tuple[str, str]]
    resolved: dict[str, int]


class Catalog:
    def __init__(
        self, *, db: Database, approval: ProviderApproval, unsubscribe_url: str, cache_size: int = 1024
    ) -> None:
        self.db = db
        self.approval = approval
        self.unsubscribe_url = unsubscribe_url
        self.cache_size = cache_size
        # (workspace_id, template_id, version) -> compiled PUBLISHED version. The workspace is
        # part of the key so one tenant can never render another's template by guessing its id.
        # Entries never go stale: PUBLISHED is final and templates are never deleted (a future
        # delete or unpublish must evict here).
        self._cache: OrderedDict[tuple[str, str, int], Renderable] = OrderedDict()

    # --- authoring ----------------------------------------------------------------------------

    async def create(
        self,
        *,
        workspace_id: str,
        name: str,
        channel: int,
        message_type: int,
        content: pb.TemplateContent,
        variables: Sequence[pb.Variable],
    ) -> tuple[repo.TemplateRecord, repo.VersionRecord]:
        checks.validate_version(
            channel=channel, message_type=message_type, name=name, content=content, variables=variables
        )
        return await self.db.run(
            lambda s: repo.insert_template(
                s,
                workspace_id=workspace_id,
                template_id=new_template_id(),
                name=name.strip(),
                channel=channel,
                message_type=message_type,
                content=content,
                variables=variables,
            )
        )

    async def get(
        self, *, workspace_id: str, template_id: str
    ) -> tuple[repo.TemplateRecord, repo.VersionRecord]:
        def work(s: Session) -> tuple[repo.TemplateRecord, repo.VersionRecord]:
            template = self._template(s, workspace_id, template_id)
            return template, self._version(s, template, template.latest_version)

        return await self.db.run(work)

    @staticmethod
    def _template(
        s: Session, workspace_id: str, template_id: str, *, for_update: bool = False
    ) -> repo.TemplateRecord:
        template = repo.get_template(
            s, workspace_id=workspace_id, template_id=template_id, for_update=for_update
        )
        if template is None:
            raise NotFound(f"template {template_id!r} not found", reason="template_not_found")
        return template

    @staticmethod
    def _version(s: Session, template: repo.TemplateRecord, number: int) -> repo.VersionRecord:
        found = repo.get_version(
            s, workspace_id=template.workspace_id, template_id=template.id, version=number
        )
        if found is None:
            raise NotFound(
                f"template {template.id!r} has no version {number} (latest is {template.latest_version})",
                reason="version_not_found",
            )
        return found

    async def list_page(
        self,
        *,
        workspace_id: str,
        channel: int,
        message_type: int,
        state: int,
        page_size: int,
        page_token: str,
    ) -> tuple[list[tuple[repo.TemplateRecord, repo.VersionRecord]], str]:
        if page_size < 0:
            raise InvalidArgument.of("page.page_size", "must not be negative")
        limit = min(page_size or PAGE_DEFAULT, PAGE_MAX)
        before: int | None = None
        if page_token:
            try:
                before = int(page_token)
            except ValueError:
                raise InvalidArgument.of("page.page_token", "is not a token this service returned") from None
        page, next_seq = await self.db.run(
            lambda s: repo.list_templates(
                s,
                workspace_id=workspace_id,
                channel=channel,
                message_type=message_type,
                state=state,
                before_seq=before,
                limit=limit,
            )
        )
        return page, "" if next_seq is None else str(next_seq)

    async def update(
        self,
        *,
        workspace_id: str,
        template_id: str,
        name: str,
        content: pb.TemplateContent | None,
        variables: Sequence[pb.Variable],
    ) -> tuple[repo.TemplateRecord, repo.VersionRecord]:
        """A new DRAFT version (content and/or variables given), or only a rename."""
        if name and len(name) > checks.NAME_MAX:
            raise InvalidArgument.of("name", f"longer than {checks.NAME_MAX} characters")

        def work(s: Session) -> tuple[repo.TemplateRecord, repo.VersionRecord]:
            template = self._template(s, workspace_id, template_id, for_update=True)
            new_name = name.strip() or template.name
            latest = self._version(s, template, template.latest_version)
            if content is None and not variables:
                repo.rename(s, template=template, name=new_name)
                return self._template(s, workspace_id, template_id), latest
            # Variables alone re-use the latest content; content alone declares what it lists.
            new_content = content if content is not None else latest.content
            checks.validate_version(channel=template.channel, content=new_content, variables=variables)
            version = repo.add_version(
                s, template=template, content=new_content, variables=variables, name=new_name
            )
            return self._template(s, workspace_id, template_id), version

        return await self.db.run(work)

    async def versions(self, *, workspace_id: str, template_id: str) -> list[repo.VersionRecord]:
        def work(s: Session) -> list[repo.VersionRecord]:
            self._template(s, workspace_id, template_id)
            return repo.list_versions(s, workspace_id=workspace_id, template_id=template_id)

        return await self.db.run(work)

    # --- state machine ------------------------------------------------------------------------

    async def _load_version(
        self, workspace_id: str, template_id: str, version: int
    ) -> tuple[repo.TemplateRecord, repo.VersionRecord]:
        def work(s: Session) -> tuple[repo.TemplateRecord, repo.VersionRecord]:
            template = self._template(s, workspace_id, template_id)
            return template, self._version(s, template, version or template.latest_version)

        return await self.db.run(work)

    async def _move(
        self, template: repo.TemplateRecord, version: repo.VersionRecord, to_state: int, reason: str = ""
    ) -> repo.VersionRecord:
        moved = await self.db.run(
            lambda s: repo.move_state(
                s,
                workspace_id=template.workspace_id,
                template_id=template.id,
                version=version.version,
                from_state=version.state,
                to_state=to_state,
                reason=reason,
            )
        )
        if moved is None:
            # Someone else moved it meanwhile (an operator, a concurrent publish): report what it is now.
            _, now = await self._load_version(template.workspace_id, template.id, version.version)
            raise _wrong_state(now, "moved concurrently")
        log.info(
            "template %s version %d: %s -> %s",
            template.id,
            version.version,
            state_name(version.state),
            state_name(to_state),
        )
        return moved

    async def publish(self, *, workspace_id: str, template_id: str, version: int) -> repo.VersionRecord:
        template, found = await self._load_version(workspace_id, template_id, version)
        if found.state == repo.PENDING:
            # The operator records the provider's approval.
            return await self._move(template, found, repo.PUBLISHED)
        if found.state != repo.DRAFT:
            raise _wrong_state(found, "only a DRAFT or PENDING_APPROVAL version can be published")
        if template.channel not in CHANNELS_NEEDING_APPROVAL:
            return await self._move(template, found, repo.PUBLISHED)
        decision = await self.approval.submit(
            Submission(
                workspace_id=workspace_id,
                template_id=template_id,
                version=found.version,
                channel=template.channel,
                message_type=template.message_type,
                content=found.content,
            )
        )
        if decision.verdict is Verdict.APPROVED:
            return await self._move(template, found, repo.PUBLISHED)
        if decision.verdict is Verdict.REJECTED:
            return await self._move(
                template, found, repo.REJECTED, decision.reason or "rejected by the provider"
            )
        return await self._move(template, found, repo.PENDING)

    async def reject(
        self, *, workspace_id: str, template_id: str, version: int, reason: str
    ) -> repo.VersionRecord:
        reason = reason.strip()
        if not reason:
            raise InvalidArgument.of("reason", "is required")
        if len(reason) > REASON_MAX:
            raise InvalidArgument.of("reason", f"longer than {REASON_MAX} characters")
        template, found = await self._load_version(workspace_id, template_id, version)
        if found.state not in (repo.DRAFT, repo.PENDING):
            raise _wrong_state(found, "only a DRAFT or PENDING_APPROVAL version can be rejected")
        return await self._move(template, found, repo.REJECTED, reason)

    # --- rendering ----------------------------------------------------------------------------

    def _compile(self, template: repo.TemplateRecord, version: repo.VersionRecord) -> Renderable:
        compiled = r.compile_template(
            channel=template.channel,
            message_type=template.message_type,
            content=version.content,
            variables=decls_of(version.variables),
            unsubscribe_url=self.unsubscribe_url,
        )
        return Renderable(template.id, version.version, version.state, compiled)

    def _cached(self, key: tuple[str, str, int]) -> Renderable | None:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
        return hit

    def _remember(self, key: tuple[str, str, int], item: Renderable) -> None:
        self._cache[key] = item
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def renderable(
        self, *, workspace_id: str, template_id: str, version: int, published_only: bool = True
    ) -> Renderable:
        """The compiled version to render; version 0 is the latest published.

        With `published_only=False` (Preview) any version renders, and version 0 falls back to
        the latest version when nothing is published yet.
        """
        number = version
        if not number:
            template = await self.db.run(lambda s: self._template(s, workspace_id, template_id))
            number = template.published_version
            if not number:
                if published_only:
                    raise FailedPrecondition(
                        f"template {template_id!r} has no PUBLISHED version "
                        f"(latest version {template.latest_version} is {state_name(template.latest_state)})",
                        reason="template_not_published",
                    )
                number = template.latest_version
        hit = self._cached((workspace_id, template_id, number))
        if hit is not None:
            return hit
        template, found = await self._load_version(workspace_id, template_id, number)
        if published_only and found.state != repo.PUBLISHED:
            raise _wrong_state(found, "only a PUBLISHED version can be sent")
        item = self._compile(template, found)
        if found.state == repo.PUBLISHED:
            self._remember((workspace_id, template_id, found.version), item)
        return item

    async def validate_for_launch(
        self, *, workspace_id: str, launch_checks: Sequence[LaunchCheck]
    ) -> LaunchResult:
        ids = sorted({c.template_id for c in launch_checks if c.template_id})

        def work(
            s: Session,
        ) -> tuple[dict[str, repo.TemplateRecord], dict[tuple[str, int], repo.VersionState]]:
            if not ids:
                return {}, {}
            return (
                repo.get_templates(s, workspace_id=workspace_id, template_ids=ids),
                repo.version_states(s, workspace_id=workspace_id, template_ids=ids),
            )

        templates, states = await self.db.run(work)
        problems: list[tuple[str, str]] = []
        resolved: dict[str, int] = {}
        for check in launch_checks:
            found = _launch_problems(check, templates, states)
            if isinstance(found, int):
                resolved[check.node_id] = found
            else:
                problems.extend((check.node_id, reason) for reason in found)
        return LaunchResult(problems, resolved)


def _launch_problems(
    check: LaunchCheck,
    templates: dict[str, repo.TemplateRecord],
    states: dict[tuple[str, int], repo.VersionState],
) -> int | list[str]:
    """The version a node would send, or why it cannot."""
    if not check.template_id:
        return ["no template selected"]
    template = templates.get(check.template_id)
    if template is None:
        return [f"template {check.template_id} not found"]
    reasons: list[str] = []
    if template.channel != check.channel:
        reasons.append(
            f"template {template.id} is for channel {channel_name(template.channel)}, "
            f"the node sends on {channel_name(check.channel)}"
        )
    if template.message_type != check.message_type:
        reasons.append(
            f"template {template.id} is for message type {message_type_name(template.message_type)}, "
            f"the node sends {message_type_name(check.message_type)}"
        )
    number = check.version or template.published_version
    if check.version < 0:
        reasons.append(f"version {check.version} is not a version number")
    elif not number:
        reasons.append(
            f"template {template.id} has no PUBLISHED version "
            f"(latest version {template.latest_version} is {state_name(template.latest_state)})"
        )
    else:
        state = states.get((template.id, number))
        if state is None:
            reasons.append(f"template {template.id} has no version {number}")
        elif state.state != repo.PUBLISHED:
            why = (
                f" ({state.rejection_reason})"
                if state.state == repo.REJECTED and state.rejection_reason
                else ""
            )
            reasons.append(
                f"template {template.id} version {number} is {state_name(state.state)}{why}, not PUBLISHED"
            )
    return reasons or number


def _wrong_state(version: repo.VersionRecord, rule: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"template {version.template_id!r} version {version.version} is {state_name(version.state)}: {rule}",
        reason="template_wrong_state",
    )
