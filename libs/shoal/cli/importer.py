"""Bulk contact import: a file streamed in chunks to `POST /v1/contacts/import`.

Rows that cannot be contacts (see `contacts_file`) are rejected locally with their line number;
the API's rejections (`{index, field, reason}`, index within the chunk) are mapped back to line
numbers. A chunk is also cut when its JSON grows near the gateway's body limit; a 413 halves the
chunk and a 400 naming rows (`contacts.<i>.<field>`) rejects those rows and sends the rest again,
so one bad row never costs its neighbours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shoal.cli.client import ApiError, ShoalClient
from shoal.cli.contacts_file import Row

DEFAULT_CHUNK = 1000
MAX_CHUNK = 10_000
# The gateway refuses bodies over 2 MiB by default; stay well below.
MAX_CHUNK_BYTES = 1_500_000
_ROW_FIELD = re.compile(r"^contacts(?:\.|\[)(\d+)\]?(?:\.(.*))?$")


@dataclass(frozen=True)
class Rejected:
    line: int
    field: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "reason": self.reason}


@dataclass
class Summary:
    rows: int = 0
    imported: int = 0
    updated: int = 0
    rejected: list[Rejected] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "imported": self.imported,
            "updated": self.updated,
            "rejected": [r.as_json() for r in sorted(self.rejected, key=lambda r: r.line)],
        }


def _row_field(path: str) -> tuple[int, str] | None:
    """(index, inner field) of an error path like `contacts.3.email` or `contacts[3].email`."""
    match = _ROW_FIELD.match(path)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) or ""


class Importer:
    def __init__(
        self,
        client: ShoalClient,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        on_rows: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.client = client
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.on_rows = on_rows
        self.summary = Summary()

    def run(self, rows: Iterable[Row]) -> Summary:
        chunk: list[tuple[int, dict[str, Any]]] = []
        size = 0
        for row in rows:
            self.summary.rows += 1
            if row.contact is None:
                self.summary.rejected.append(Rejected(row.line, row.field, row.reason))
                self.on_rows(1)
                continue
            encoded = len(json.dumps(row.contact, separators=(",", ":"))) + 1
            if chunk and size + encoded > self.max_chunk_bytes:
                self._send(chunk)
                chunk, size = [], 0
            chunk.append((row.line, row.contact))
            size += encoded
            if len(chunk) >= self.chunk_size:
                self._send(chunk)
                chunk, size = [], 0
        if chunk:
            self._send(chunk)
        return self.summary

    def _send(self, chunk: list[tuple[int, dict[str, Any]]]) -> None:
        pending = chunk
        while pending:
            try:
                reply = self.client.import_contacts([contact for _, contact in pending])
            except ApiError as exc:
                if exc.status == 413 and len(pending) > 1:
                    half = len(pending) // 2
                    self._send(pending[:half])
                    self._send(pending[half:])
                    return
                if exc.status == 413:
                    self._reject(pending[0][0], "", "the contact is larger than the API accepts")
                    return
                bad = self._rows_named(exc, len(pending))
                if not bad:
                    raise
                for index, (inner, reason) in sorted(bad.items()):
                    self._reject(pending[index][0], inner, reason)
                pending = [item for i, item in enumerate(pending) if i not in bad]
                continue
            self._account(pending, reply)
            return

    @staticmethod
    def _rows_named(exc: ApiError, count: int) -> dict[int, tuple[str, str]]:
        """The rows a 400 blames, when every detail names one of them; else nothing."""
        if exc.status != 400 or not exc.details:
            return {}
        bad: dict[int, tuple[str, str]] = {}
        for detail in exc.details:
            parsed = _row_field(str(detail.get("field", "")))
            if parsed is None or parsed[0] >= count:
                return {}
            index, inner = parsed
            if index in bad:
                inner = bad[index][0] or inner
                reason = f"{bad[index][1]}; {detail.get('message', '')}"
            else:
                reason = str(detail.get("message", "invalid"))
            bad[index] = (inner, reason)
        return bad

    def _reject(self, line: int, field_name: str, reason: str) -> None:
        self.summary.rejected.append(Rejected(line, field_name, reason))
        self.on_rows(1)

    def _account(self, sent: list[tuple[int, dict[str, Any]]], reply: dict[str, Any]) -> None:
        self.summary.imported += int(reply.get("imported", 0))
        self.summary.updated += int(reply.get("updated", 0))
        rejected = list(reply.get("rejected") or [])
        for item in rejected:
            index = int(item.get("index", -1))
            line = sent[index][0] if 0 <= index < len(sent) else 0
            raw_field = str(item.get("field") or "")
            parsed = _row_field(raw_field)
            self.summary.rejected.append(
                Rejected(line, parsed[1] if parsed else raw_field, str(item.get("reason", "")))
            )
        self.on_rows(len(sent))
