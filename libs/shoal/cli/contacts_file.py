"""Reading a contacts file row by row, whatever its size: CSV or JSON Lines.

Every data row becomes a `Row` with its line number: either a contact in the REST create shape,
or a rejection (bad JSON, wrong column count, bytes that are not UTF-8, a custom value that does
not parse). A malformed row never stops the reading.

CSV: a header row naming the columns, any subset in any order of `external_id, email, phone,
first_name, last_name, tags, status`, plus `custom.<name>` columns for custom fields (strings;
`custom.<name>:number`, `:bool` and `:timestamp` send typed values) and `consent.<CHANNEL>.<TYPE>`
columns (`consent.EMAIL.NEWSLETTER`: GRANTED, REVOKED or PENDING, recorded with source
`csv import`). Tags are separated by spaces or `;`. Empty cells are left out of the contact. The
line number of a row is the line where its record starts (the header is line 1).

JSON Lines (`.jsonl`, `.ndjson`): one contact object per line, sent as it is; blank lines are
skipped.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shoal.cli.ui import UsageProblem

STANDARD_COLUMNS = ("external_id", "email", "phone", "first_name", "last_name", "tags", "status")
CUSTOM_PREFIX = "custom."
CONSENT_PREFIX = "consent."
CONSENT_SOURCE = "csv import"
# Where the REST contact shape keeps custom fields.
CUSTOM_KEY = "fields"
CUSTOM_TYPES = ("string", "number", "bool", "timestamp")
_TAG_SPLIT = re.compile(r"[;\s]+")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}

Kind = Literal["csv", "jsonl"]


@dataclass(frozen=True)
class Row:
    """One data row of the file: a contact, or the reason it cannot be one."""

    line: int
    contact: dict[str, Any] | None = None
    field: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.contact is not None


@dataclass(frozen=True)
class Column:
    name: str
    # "standard", "custom" (a custom field) or "consent" (name: CHANNEL.MESSAGE_TYPE).
    group: str = "standard"
    kind: str = "string"

    @property
    def label(self) -> str:
        if self.group == "custom":
            return f"{CUSTOM_PREFIX}{self.name}"
        if self.group == "consent":
            return f"{CONSENT_PREFIX}{self.name}"
        return self.name


@dataclass
class ContactsFile:
    path: Path
    kind: Kind
    columns: list[Column] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path) -> ContactsFile:
        """Check the file can be read as contacts (suffix, header) before anything is sent."""
        suffix = path.suffix.lower()
        if suffix == ".csv":
            kind: Kind = "csv"
        elif suffix in (".jsonl", ".ndjson"):
            kind = "jsonl"
        else:
            raise UsageProblem(f"{path}: expected a .csv or .jsonl file")
        if not path.is_file():
            raise UsageProblem(f"{path}: no such file")
        found = cls(path, kind)
        if kind == "csv":
            found.columns = found._read_header()
        return found

    # ---- reading -----------------------------------------------------------------------------

    def _lines(self) -> Iterator[tuple[str, bool]]:
        """Decoded lines with their line endings, and whether each was valid UTF-8."""
        with self.path.open("rb") as fh:
            first = True
            for line in fh:
                raw = line[3:] if first and line.startswith(b"\xef\xbb\xbf") else line
                first = False
                try:
                    yield raw.decode("utf-8"), True
                except UnicodeDecodeError:
                    yield raw.decode("utf-8", errors="surrogateescape"), False

    def _read_header(self) -> list[Column]:
        lines = (text for text, _ in self._lines())
        try:
            header = next(csv.reader(lines), None)
        except csv.Error as exc:
            raise UsageProblem(f"{self.path}: line 1: the header is not valid CSV ({exc})") from None
        if not header or not any(h.strip() for h in header):
            raise UsageProblem(f"{self.path}: line 1: expected a header row naming the columns")
        columns: list[Column] = []
        unknown: list[str] = []
        for raw in header:
            name = raw.strip()
            if name.startswith(CUSTOM_PREFIX):
                custom, _, kind = name.removeprefix(CUSTOM_PREFIX).partition(":")
                kind = kind or "string"
                if not custom or kind not in CUSTOM_TYPES:
                    unknown.append(name)
                columns.append(Column(custom, "custom", kind))
            elif name.startswith(CONSENT_PREFIX):
                channel, _, message_type = name.removeprefix(CONSENT_PREFIX).upper().partition(".")
                if not channel or not message_type:
                    unknown.append(name)
                columns.append(Column(f"{channel}.{message_type}", "consent"))
            elif name.lower() in STANDARD_COLUMNS:
                columns.append(Column(name.lower()))
            else:
                unknown.append(name or "(empty)")
        if unknown:
            raise UsageProblem(
                f"{self.path}: line 1: unknown column(s) {', '.join(unknown)}; known: "
                f"{', '.join(STANDARD_COLUMNS)}, custom.<name>[:{'|'.join(CUSTOM_TYPES)}] "
                "and consent.<CHANNEL>.<MESSAGE_TYPE>"
            )
        seen: set[str] = set()
        for column in columns:
            if column.label in seen:
                raise UsageProblem(f"{self.path}: line 1: column {column.label!r} appears twice")
            seen.add(column.label)
        return columns

    def rows(self) -> Iterator[Row]:
        return self._csv_rows() if self.kind == "csv" else self._jsonl_rows()

    def _jsonl_rows(self) -> Iterator[Row]:
        for number, (text, valid) in enumerate(self._lines(), start=1):
            if not text.strip():
                continue
            if not valid:
                yield Row(number, reason="not valid UTF-8")
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                yield Row(number, reason=f"not valid JSON: {exc}")
                continue
            if not isinstance(value, dict):
                yield Row(number, reason=f"expected a JSON object, found {type(value).__name__}")
                continue
            yield Row(number, contact=value)

    def _csv_rows(self) -> Iterator[Row]:
        invalid_lines: set[int] = set()
        counter = {"line": 0}

        def lines() -> Iterator[str]:
            for text, valid in self._lines():
                counter["line"] += 1
                if not valid:
                    invalid_lines.add(counter["line"])
                yield text

        reader = csv.reader(lines())
        start = 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row(start, reason=f"not valid CSV: {exc}")
                start = counter["line"] + 1
                continue
            line, start = start, counter["line"] + 1
            if line == 1:
                continue  # the header, checked by open()
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line
            if any(n in invalid_lines for n in range(line, start)):
                yield Row(line, reason="not valid UTF-8")
                continue
            if len(record) != len(self.columns):
                yield Row(line, reason=f"expected {len(self.columns)} columns, found {len(record)}")
                continue
            yield self._csv_contact(line, record)

    def _csv_contact(self, line: int, record: list[str]) -> Row:
        contact: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        consents: list[dict[str, Any]] = []
        for column, raw in zip(self.columns, record, strict=True):
            value = raw.strip()
            if not value:
                continue
            if column.group == "custom":
                try:
                    custom[column.name] = _typed(value, column.kind)
                except ValueError as exc:
                    return Row(line, field=column.label, reason=str(exc))
            elif column.group == "consent":
                channel, _, message_type = column.name.partition(".")
                consents.append(
                    {
                        "channel": channel,
                        "message_type": message_type,
                        "status": value.upper(),
                        "source": CONSENT_SOURCE,
                    }
                )
            elif column.name == "tags":
                contact["tags"] = [t for t in _TAG_SPLIT.split(value) if t]
            elif column.name == "status":
                contact["status"] = value.upper()
            else:
                contact[column.name] = value
        if custom:
            contact[CUSTOM_KEY] = custom
        if consents:
            contact["consents"] = consents
        return Row(line, contact=contact)

    # ---- size --------------------------------------------------------------------------------

    def count(self) -> int:
        """How many data rows there are (a fast pass over the file, for the progress bar)."""
        if self.kind == "jsonl":
            with self.path.open("rb") as fh:
                return sum(1 for raw in fh if raw.strip())
        total = 0
        lines = (text for text, _ in self._lines())
        reader = csv.reader(lines)
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error:
                total += 1
                continue
            if record and not (len(record) == 1 and not record[0].strip()):
                total += 1
        return max(total - 1, 0)


def _typed(value: str, kind: str) -> Any:
    if kind == "number":
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a finite number")
        return (
            int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        )
    if kind == "bool":
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, 1/0)")
    if kind == "timestamp":
        return {"timestamp": value}
    return value
