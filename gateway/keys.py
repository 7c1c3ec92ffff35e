"""API keys: creation (shown once), verification (constant time), revocation, and the admin CLI.

A key reads `shoal_<key id>_<secret>`: the id (`k` + 16 base32 characters) finds the record, the
secret (32 random bytes, URL-safe base64) is checked against its stored SHA-256 with
`hmac.compare_digest`. Neither the key nor the secret is ever stored or logged; the id is
what logs, audits (`actor`) and rate limits name.

CLI (the first key of a workspace has to come from somewhere):
    python -m gateway.keys create --workspace ws_default --scope admin
    python -m gateway.keys list --workspace ws_default
    python -m gateway.keys revoke k0123456789abcdef
    python -m gateway.keys bootstrap --workspace ws_default   (the runner: a key only if none exists)
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import update
from sqlmodel import Session, col, select

from gateway.config import GatewaySettings
from gateway.models import ApiKey
from shoal.config import ConfigError
from shoal.db import Database

MIGRATIONS = Path(__file__).parent / "migrations"
KEY_PREFIX = "shoal_"
_KEY_RE = re.compile(r"^shoal_(k[a-z2-7]{16})_([A-Za-z0-9_-]{43})$")
_WORKSPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CAMPAIGN_RE = re.compile(r"^[0-9a-fA-F-]{36}$")


class Scope(enum.StrEnum):
    CAMPAIGNS_READ = "campaigns:read"
    CAMPAIGNS_TRIGGER = "campaigns:trigger"
    CAMPAIGNS_WRITE = "campaigns:write"
    CONTACTS_READ = "contacts:read"
    CONTACTS_WRITE = "contacts:write"
    TEMPLATES_READ = "templates:read"
    TEMPLATES_WRITE = "templates:write"
    BILLING_READ = "billing:read"
    BILLING_WRITE = "billing:write"
    WEBHOOKS_READ = "webhooks:read"
    WEBHOOKS_WRITE = "webhooks:write"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: what a verified key allows."""

    key_id: str
    workspace_id: str
    scopes: frozenset[Scope]
    # Empty: every campaign of the workspace.
    campaign_ids: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        """`admin` allows everything; `<resource>:write` also allows `<resource>:read`."""
        if Scope.ADMIN in self.scopes or scope in self.scopes:
            return True
        resource, _, action = scope.value.partition(":")
        return action == "read" and f"{resource}:write" in self.scopes

    def may_touch_campaign(self, campaign_id: str) -> bool:
        return not self.campaign_ids or campaign_id.lower() in self.campaign_ids

    @property
    def actor(self) -> str:
        """What audits record as the one who acted."""
        return f"api_key:{self.key_id}"


@dataclass(frozen=True)
class CreatedKey:
    principal: Principal
    # The full key, to show once; nothing else keeps it.
    key: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_id() -> str:
    return "k" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    match = _KEY_RE.match(key)
    return (match.group(1), match.group(2)) if match else None


def _principal(row: ApiKey) -> Principal:
    return Principal(
        key_id=row.id,
        workspace_id=row.workspace_id,
        scopes=frozenset(Scope(s) for s in row.scopes.split()),
        campaign_ids=frozenset(row.campaign_ids.split()),
    )


def validate_request(workspace_id: str, scopes: Sequence[str], campaign_ids: Sequence[str]) -> list[Scope]:
    if not _WORKSPACE_RE.match(workspace_id):
        raise ValueError("workspace: letters, digits, '_' or '-', at most 64")
    if not scopes:
        raise ValueError(f"at least one scope: {', '.join(s.value for s in Scope)}")
    try:
        parsed = [Scope(s) for s in scopes]
    except ValueError:
        raise ValueError(f"unknown scope; known: {', '.join(s.value for s in Scope)}") from None
    bad = [c for c in campaign_ids if not _CAMPAIGN_RE.match(c)]
    if bad:
        raise ValueError(f"campaign ids are UUIDs: {', '.join(bad)}")
    return sorted(set(parsed))


def create_key(
    session: Session,
    *,
    workspace_id: str,
    scopes: Sequence[str],
    campaign_ids: Sequence[str] = (),
    name: str = "",
) -> CreatedKey:
    parsed = validate_request(workspace_id, scopes, campaign_ids)
    key_id = new_key_id()
    secret = secrets.token_urlsafe(32)
    row = ApiKey(
        id=key_id,
        workspace_id=workspace_id,
        name=name[:200],
        secret_sha256=_digest(secret),
        scopes=" ".join(parsed),
        campaign_ids=" ".join(sorted({c.lower() for c in campaign_ids})),
    )
    session.add(row)
    session.flush()
    return CreatedKey(principal=_principal(row), key=f"{KEY_PREFIX}{key_id}_{secret}")


def verify_key(session: Session, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key, else None (which part was wrong is not said)."""
    parts = split_key(key)
    if parts is None:
        return None
    key_id, secret = parts
    row = session.get(ApiKey, key_id)
    # Compared even when no row matched, so a wrong id costs what a wrong secret costs.
    stored = row.secret_sha256 if row is not None else "0" * 64
    matches = hmac.compare_digest(_digest(secret), stored)
    if row is None or not matches or row.revoked_at is not None:
        return None
    return _principal(row)


def revoke_key(session: Session, key_id: str) -> bool:
    result = session.execute(
        update(ApiKey)
        .where(col(ApiKey.id) == key_id, col(ApiKey.revoked_at).is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_keys(session: Session, *, workspace_id: str) -> list[dict[str, object]]:
    rows = session.execute(
        select(ApiKey).where(col(ApiKey.workspace_id) == workspace_id).order_by(col(ApiKey.created_at))
    ).scalars()
    return [
        {
            "id": r.id,
            "name": r.name,
            "workspace_id": r.workspace_id,
            "scopes": r.scopes.split(),
            "campaign_ids": r.campaign_ids.split(),
            "created_at": r.created_at.isoformat(),
            "revoked": r.revoked_at is not None,
        }
        for r in rows
    ]


def count_keys(session: Session) -> int:
    return len(session.execute(select(col(ApiKey.id)).limit(1)).all())


def open_store(settings: GatewaySettings) -> Database:
    """The key store, migrated to the newest schema."""
    db = Database(settings.resolved_database_url(), migrations_dir=MIGRATIONS)
    db.migrate()
    return db


def bootstrap_admin_key(database_url: str, workspace_id: str) -> str | None:
    """A new admin key when the store holds no key at all (a fresh data folder), else None."""
    db = Database(database_url, migrations_dir=MIGRATIONS)
    try:
        db.migrate()
        with db.session() as session:
            if count_keys(session):
                return None
            return create_key(session, workspace_id=workspace_id, scopes=[Scope.ADMIN], name="bootstrap").key
    finally:
        db.engine.dispose()


# ---- CLI -------------------------------------------------------------------------------------

cli = typer.Typer(add_completion=False, help="Manage the gateway's API keys.")


def _store() -> Database:
    try:
        return open_store(GatewaySettings.load())
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@cli.command()
def create(
    workspace: Annotated[str, typer.Option("--workspace", help="Workspace the key acts in.")],
    scope: Annotated[list[str], typer.Option("--scope", help="Repeat for several scopes.")],
    campaign: Annotated[
        list[str] | None, typer.Option("--campaign", help="Restrict the key to these campaign ids.")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="A label for people.")] = "",
    output: Annotated[str, typer.Option("--output", help="text or json")] = "text",
) -> None:
    """Create a key and print it once: it cannot be shown again."""
    db = _store()
    try:
        with db.session() as session:
            created = create_key(
                session, workspace_id=workspace, scopes=scope, campaign_ids=campaign or [], name=name
            )
    except ValueError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        db.engine.dispose()
    p = created.principal
    if output == "json":
        typer.echo(json.dumps({"id": p.key_id, "key": created.key, "workspace_id": p.workspace_id}))
        return
    typer.echo(created.key)
    typer.echo(
        f"key id {p.key_id}, workspace {p.workspace_id}, scopes {' '.join(sorted(p.scopes))}; "
        "store it now: it is not shown again",
        err=True,
    )


@cli.command()
def bootstrap(workspace: Annotated[str, typer.Option("--workspace")]) -> None:
    """An admin key if the store holds no key at all (a new data folder): `{"key": ...|null}`."""
    try:
        settings = GatewaySettings.load()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    key = bootstrap_admin_key(settings.resolved_database_url(), workspace)
    typer.echo(json.dumps({"key": key}))


@cli.command("list")
def list_(workspace: Annotated[str, typer.Option("--workspace")]) -> None:
    """The keys of a workspace (ids and scopes, never secrets)."""
    db = _store()
    try:
        with db.session() as session:
            typer.echo(json.dumps(list_keys(session, workspace_id=workspace), indent=2))
    finally:
        db.engine.dispose()


@cli.command()
def revoke(key_id: str) -> None:
    """Revoke a key by id; requests with it answer 401 from then on."""
    db = _store()
    try:
        with db.session() as session:
            done = revoke_key(session, key_id)
    finally:
        db.engine.dispose()
    if not done:
        typer.echo(f"no active key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


def _scopes_text(scopes: Iterable[Scope]) -> str:
    return " ".join(sorted(scopes))


if __name__ == "__main__":
    sys.exit(cli())
