"""Campaign-as-code: `shoal apply -f campaign.yaml`.

The document declares templates (by name), at most one segment (by name, with its filter) and
one campaign (by name, with its trigger and flow). SEND steps name their templates
(`template: welcome-email`, or `{name: welcome-email, version: 2}` to pin a version); apply
resolves the names to ids. Everything else is the REST API's own JSON shape, so the document
reads like the API reference.

Apply is idempotent. Objects are matched by name within the workspace (an ARCHIVED campaign is
not matched; two live objects of one kind sharing a name the document uses is an error); for
each one:
- missing: created (a template's version 1 is published);
- present and equal to the document (the fields the document gives; what the server adds, like
  defaults, is not a difference): unchanged;
- present and different: a template gets a new version, which is published; a segment is
  patched; a campaign is patched only while DRAFT, otherwise it is left as it is and reported.
`--dry-run` computes the same plan without writing; `--start` launches a DRAFT campaign after.
YAML is read with YAML 1.2 booleans (only true/false), so a CONDITION's `yes:` and `no:` stay keys.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.table import Table

from shoal.cli.client import JSON, ShoalClient
from shoal.cli.ui import Failure, UsageProblem

# What a document may say about a template: the API's create body.
TEMPLATE_FIELDS = ("channel", "message_type", "content", "variables")
SEND_TEMPLATE_KEYS = ("template", "sms_template")
EDITABLE_STATES = frozenset({"DRAFT"})


class TemplateDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    channel: str
    message_type: str
    content: dict[str, Any]
    variables: list[dict[str, Any]] | None = None


class SegmentDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    filter: dict[str, Any] | None = Field(description="null: every contact of the workspace")


class CampaignDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    segment: str | None = Field(
        default=None, description="A segment by name; default: the document's segment, if any"
    )
    trigger: dict[str, Any]
    flow: dict[str, Any]


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    templates: list[TemplateDoc] = Field(default_factory=list)
    segment: SegmentDoc | None = None
    campaign: CampaignDoc


_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


def _yaml_loader() -> Any:
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false.

    YAML 1.1 reads `yes`, `no`, `on`, `off` as booleans, which would turn a CONDITION's `yes:`
    and `no:` branches into `True:` and `False:` keys.
    """
    import yaml  # type: ignore[import-untyped,unused-ignore]  # PyYAML ships no types

    class Loader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    return Loader


def _check_keys(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UsageProblem(f"{where}: the key {key!r} must be a string (quote it)")
            _check_keys(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_keys(item, f"{where}.{i}")


def load(path: Path) -> Document:
    """The document, validated; every problem is a UsageProblem naming the place."""
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]  # PyYAML ships no types
    except ImportError:  # pragma: no cover - a dependency of the project
        raise UsageProblem("shoal apply needs PyYAML (pip install pyyaml)") from None
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageProblem(f"{path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_yaml_loader())  # noqa: S506  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UsageProblem(f"{path}: {where}not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageProblem(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageProblem(f"{path}: expected a mapping with templates, segment and campaign")
    _check_keys(raw, str(path))
    try:
        document = Document.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}" for e in exc.errors()
        )
        raise UsageProblem(f"{path}: {problems}") from None
    names = [t.name for t in document.templates]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageProblem(f"{path}: template(s) declared twice: {', '.join(repeated)}")
    return document


# ---- comparing -------------------------------------------------------------------------------


_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def _seconds(text: str) -> int | None:
    """Seconds of an ISO 8601 duration (`PT90M`), or None when `text` is not one."""
    match = _DURATION.match(text)
    if match is None or text in ("P", "PT") or text.endswith("T"):
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def covers(actual: Any, desired: Any) -> bool:
    """Whether `actual` says everything `desired` says (extra keys in `actual` do not count).

    Lists must have the same length and cover element by element; a desired null matches a
    missing or null actual value; enum-like strings compare case-sensitively; ISO durations
    compare by length (the API answers `PT90M` as `PT1H30M`).
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        return all(
            (actual.get(k) is None) if v is None else (k in actual and covers(actual[k], v))
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(covers(a, d) for a, d in zip(actual, desired, strict=True))
        )
    if isinstance(desired, bool) or isinstance(actual, bool):
        return actual is desired
    if isinstance(desired, int | float) and isinstance(actual, int | float):
        return float(actual) == float(desired)
    if isinstance(desired, str) and isinstance(actual, str) and desired != actual:
        wanted, found = _seconds(desired), _seconds(actual)
        return wanted is not None and wanted == found
    return bool(actual == desired)


# ---- the plan and what was done ----------------------------------------------------------------


@dataclass
class Change:
    kind: str
    name: str
    action: str
    id: str | None = None
    detail: str = ""

    def as_json(self) -> JSON:
        return {
            "kind": self.kind,
            "name": self.name,
            "action": self.action,
            "id": self.id,
            "detail": self.detail,
        }


@dataclass
class Result:
    dry_run: bool
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> JSON:
        return {
            "dry_run": self.dry_run,
            "changes": [c.as_json() for c in self.changes],
            "notes": list(self.notes),
        }


# Past tense when applied, the plan's verb on a dry run.
_PLAN_WORDS = {
    "created": "create",
    "updated": "update",
    "published": "publish",
    "started": "start",
    "unchanged": "unchanged",
    "skipped": "skip",
}


def result_table(result: Result, *, failed: bool = False) -> Table:
    title = "Plan (dry run: nothing changed)" if result.dry_run else "Applied"
    if failed:
        title += " before the error below"
    table = Table(title=title, title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("name")
    table.add_column("action", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("detail")
    styles = {"unchanged": "dim", "skipped": "yellow", "skip": "yellow"}
    for change in result.changes:
        table.add_row(
            change.kind,
            change.name,
            f"[{styles.get(change.action, 'bold')}]{change.action}[/]",
            change.id or "-",
            change.detail,
        )
    return table


@dataclass
class Named:
    """The objects of one kind in the workspace by name; a name is an error only when used twice."""

    kind: str
    index: dict[str, list[JSON]]

    def get(self, name: str) -> JSON | None:
        found = self.index.get(name) or []
        if len(found) > 1:
            ids = ", ".join(str(f.get("id")) for f in found)
            raise Failure(
                f"{len(found)} {self.kind}s are named {name!r} ({ids}); "
                "apply matches by name: rename all but one"
            )
        return found[0] if found else None


def _placeholder(name: str) -> str:
    return f"<new template {name}>"


class Applier:
    def __init__(self, client: ShoalClient, document: Document) -> None:
        self.client = client
        self.doc = document
        self.template_ids: dict[str, str] = {}
        self.existing_templates = Named("template", {})
        self.result = Result(dry_run=False)

    def run(self, *, dry_run: bool, start: bool) -> Result:
        """Apply (or plan) the document; `self.result` holds what was done so far if it fails."""
        result = self.result = Result(dry_run=dry_run)
        existing_templates = self._by_name(self.client.list_templates(), "template")
        for template in self.doc.templates:
            result.changes.append(self._template(template, existing_templates, dry_run))
        self.existing_templates = existing_templates
        segment_id: str | None = None
        existing_segments: Named | None = None
        if self.doc.segment is not None:
            existing_segments = self._by_name(self.client.list_segments(), "segment")
            change = self._segment(self.doc.segment, existing_segments, dry_run)
            result.changes.append(change)
            segment_id = change.id
        if self.doc.campaign.segment is not None and (
            self.doc.segment is None or self.doc.campaign.segment != self.doc.segment.name
        ):
            if existing_segments is None:
                existing_segments = self._by_name(self.client.list_segments(), "segment")
            named = existing_segments.get(self.doc.campaign.segment)
            if named is None:
                raise Failure(
                    f"campaign {self.doc.campaign.name}: no segment named {self.doc.campaign.segment!r}"
                )
            segment_id = str(named["id"])
        campaign_change, campaign = self._campaign(segment_id, dry_run, result)
        result.changes.append(campaign_change)
        if start:
            result.changes.append(self._start(campaign_change, campaign, dry_run))
        if dry_run:
            for change in result.changes:
                change.action = _PLAN_WORDS.get(change.action, change.action)
        return result

    # ---- lookups -----------------------------------------------------------------------------

    @staticmethod
    def _by_name(items: list[JSON], kind: str) -> Named:
        index: dict[str, list[JSON]] = {}
        for item in items:
            index.setdefault(str(item.get("name")), []).append(item)
        return Named(kind, index)

    # ---- templates ---------------------------------------------------------------------------

    def _template(self, doc: TemplateDoc, existing: Named, dry_run: bool) -> Change:
        desired: JSON = doc.model_dump(exclude={"name"}, exclude_none=True)
        found = existing.get(doc.name)
        if found is None:
            if dry_run:
                self.template_ids[doc.name] = _placeholder(doc.name)
                return Change("template", doc.name, "created", None, "version 1, published")
            made = self.client.create_template({"name": doc.name, **desired})
            template_id = str(made["id"])
            self.template_ids[doc.name] = template_id
            state = self._publish(template_id, int(made.get("latest_version", 1)))
            return Change("template", doc.name, "created", template_id, f"version 1, {state}")
        template_id = str(found["id"])
        self.template_ids[doc.name] = template_id
        for key in ("channel", "message_type"):
            if str(found.get(key)) != str(desired[key]):
                raise Failure(
                    f"template {doc.name} ({template_id}) is {found.get('channel')} "
                    f"{found.get('message_type')}, the document says {doc.channel} {doc.message_type}: "
                    "a template's channel and message type cannot change; give it another name"
                )
        current = found.get("current") or {}
        edit: JSON = {k: desired[k] for k in ("content", "variables") if k in desired}
        latest = int(found.get("latest_version") or current.get("version") or 1)
        if not covers(current, edit):
            if dry_run:
                return Change(
                    "template", doc.name, "updated", template_id, f"new version {latest + 1}, published"
                )
            updated = self.client.update_template(template_id, edit)
            version = int(updated.get("latest_version") or latest + 1)
            state = self._publish(template_id, version)
            return Change("template", doc.name, "updated", template_id, f"new version {version}, {state}")
        state = str(current.get("state", ""))
        if state == "DRAFT":
            # The content is right but its version was never published (an earlier apply stopped).
            if dry_run:
                return Change("template", doc.name, "published", template_id, f"version {latest}")
            state = self._publish(template_id, latest)
            return Change("template", doc.name, "published", template_id, f"version {latest}, {state}")
        detail = f"version {latest}, {state.lower() or 'unknown state'}"
        if state == "REJECTED":
            detail += f": {current.get('rejection_reason') or 'no reason given'}"
        return Change("template", doc.name, "unchanged", template_id, detail)

    def _publish(self, template_id: str, version: int) -> str:
        reply = self.client.publish_template(template_id, version)
        state = str(reply.get("state", "PUBLISHED"))
        if state == "REJECTED":
            raise Failure(
                f"template {template_id} version {version} was rejected: "
                f"{reply.get('rejection_reason') or 'no reason given'}"
            )
        return state.lower().replace("_", " ")

    # ---- segment -----------------------------------------------------------------------------

    def _segment(self, doc: SegmentDoc, existing: Named, dry_run: bool) -> Change:
        found = existing.get(doc.name)
        if found is None:
            if dry_run:
                return Change("segment", doc.name, "created", None)
            made = self.client.create_segment({"name": doc.name, "filter": doc.filter})
            return Change("segment", doc.name, "created", str(made["id"]))
        segment_id = str(found["id"])
        if covers(found.get("filter"), doc.filter):
            return Change("segment", doc.name, "unchanged", segment_id)
        if not dry_run:
            self.client.update_segment(segment_id, {"filter": doc.filter})
        return Change("segment", doc.name, "updated", segment_id, "filter changed")

    # ---- campaign ----------------------------------------------------------------------------

    def _resolve_ref(self, value: Any, where: str) -> Any:
        """A SEND step's template by name (`welcome` or `{name, version}`) as the API's reference."""
        if isinstance(value, str):
            name, version = value, None
        elif isinstance(value, dict) and "name" in value:
            name, version = str(value["name"]), value.get("version")
        else:
            return value  # already an id reference: the API's own shape
        template_id = self.template_ids.get(name)
        if template_id is None:
            # Not declared here: a template of the workspace, by name.
            found = self.existing_templates.get(name)
            template_id = str(found["id"]) if found is not None else None
        if template_id is None:
            raise Failure(f"{where}: no template named {name!r} in the document or the workspace")
        ref: JSON = {"template_id": template_id}
        if version is not None:
            ref["version"] = version
        return ref

    def _resolve_steps(self, steps: Any, where: str) -> None:
        """Every SEND in the tree (branches are lists: `yes`, `no`, a variant's `steps`)."""
        if not isinstance(steps, list):
            return
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                continue
            here = f"{where}.{i}"
            send = step.get("send")
            if isinstance(send, dict):
                for key in SEND_TEMPLATE_KEYS:
                    if key in send:
                        send[key] = self._resolve_ref(send[key], f"{here}.send.{key}")
            condition = step.get("condition")
            if isinstance(condition, dict):
                for branch in ("yes", "no"):
                    self._resolve_steps(condition.get(branch), f"{here}.condition.{branch}")
            ab_test = step.get("ab_test")
            if isinstance(ab_test, dict):
                for j, variant in enumerate(ab_test.get("variants") or []):
                    if isinstance(variant, dict):
                        self._resolve_steps(variant.get("steps"), f"{here}.ab_test.variants.{j}.steps")

    def resolved_flow(self) -> JSON:
        flow = copy.deepcopy(self.doc.campaign.flow)
        self._resolve_steps(flow.get("steps"), "campaign.flow.steps")
        return flow

    def _campaign(self, segment_id: str | None, dry_run: bool, result: Result) -> tuple[Change, JSON | None]:
        doc = self.doc.campaign
        desired: JSON = {"name": doc.name, "trigger": doc.trigger, "flow": self.resolved_flow()}
        if segment_id is not None:
            desired["segment_id"] = segment_id
        # An archived campaign is history: applying the document again makes a new one.
        live = [c for c in self.client.list_campaigns() if c.get("state") != "ARCHIVED"]
        found = self._by_name(live, "campaign").get(doc.name)
        if found is None:
            if dry_run:
                return Change("campaign", doc.name, "created", None, "DRAFT"), None
            made = self.client.create_campaign(desired)
            return Change(
                "campaign", doc.name, "created", str(made["id"]), str(made.get("state", "DRAFT"))
            ), made
        campaign_id = str(found["id"])
        # A list item may be a summary; the flow is compared on the full object.
        campaign = self.client.get_campaign(campaign_id) if "flow" not in found else found
        state = str(campaign.get("state", ""))
        differing = [
            k
            for k in ("name", "segment_id", "trigger", "flow")
            if k in desired and not covers(campaign.get(k), desired[k])
        ]
        if not differing:
            return Change("campaign", doc.name, "unchanged", campaign_id, state), campaign
        if state not in EDITABLE_STATES:
            result.notes.append(
                f"campaign {doc.name} ({campaign_id}) is {state}: its {', '.join(differing)} differ from "
                "the document but only a DRAFT campaign can be changed; left as it is"
            )
            return Change(
                "campaign", doc.name, "skipped", campaign_id, f"{state}: {', '.join(differing)} differ"
            ), campaign
        if dry_run:
            return Change("campaign", doc.name, "updated", campaign_id, f"{', '.join(differing)}"), campaign
        patch: JSON = {k: desired[k] for k in differing}
        updated = self.client.update_campaign(campaign_id, patch)
        return Change("campaign", doc.name, "updated", campaign_id, ", ".join(differing)), updated

    def _start(self, change: Change, campaign: JSON | None, dry_run: bool) -> Change:
        name = self.doc.campaign.name
        state = str((campaign or {}).get("state", "DRAFT"))
        if state not in EDITABLE_STATES:
            return Change("campaign", name, "unchanged", change.id, f"not started: already {state}")
        if dry_run or change.id is None:
            return Change("campaign", name, "started", change.id)
        reply = self.client.start_campaign(change.id)
        run_id = reply.get("run_id") or reply.get("current_run_id")
        detail = str(reply.get("state") or reply.get("status") or "RUNNING")
        return Change("campaign", name, "started", change.id, f"{detail}, run {run_id}" if run_id else detail)
