"""The `shoal` command line against a real gateway in front of the real mesh.

The CLI runs in-process through typer's CliRunner (synchronous, so in a worker thread while the
mesh runs on the test's loop), talking HTTP to the gateway on its real socket; one test runs
the installed console script as a subprocess. Tests for routes the gateway does not have yet are
skipped by name (the route's absence from the app's OpenAPI), so they start running as soon as
the route lands.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner, Result

from gateway.app import create_app
from gateway.config import GatewaySettings
from shoal.cli import app
from shoal.cli.apply import load
from shoal.cli.contacts_file import ContactsFile
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import execution_pb2 as epb
from tests.e2e.rest import Rest, rest_mesh
from tests.e2e.test_rest_campaigns import campaign
from tests.e2e.test_thin_run import seed
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CAMPAIGN = ROOT / "examples" / "campaign.yaml"
EXAMPLE_CONTACTS = ROOT / "examples" / "contacts.csv"


def _routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route in the gateway's OpenAPI (building the app opens nothing)."""
    gateway = create_app(GatewaySettings.load(data_dir=Path(tempfile.gettempdir()) / "shoal-cli-openapi"))
    return {(method.upper(), path) for path, ops in gateway.openapi()["paths"].items() for method in ops}


ROUTES = _routes()


def needs(*routes: str) -> pytest.MarkDecorator:
    missing = [r for r in routes if tuple(r.split(" ", 1)) not in ROUTES]
    return pytest.mark.skipif(bool(missing), reason=f"not in the gateway's OpenAPI yet: {', '.join(missing)}")


@dataclass
class Shoal:
    """`shoal --api-url <gateway> --api-key <key> ...` in a worker thread."""

    base_url: str
    key: str

    async def __call__(self, *args: str, key: str | None = None) -> Result:
        argv = ["--api-url", self.base_url, "--api-key", self.key if key is None else key, *args]
        result = await asyncio.to_thread(CliRunner().invoke, app, argv, catch_exceptions=True)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"shoal {' '.join(args)} raised {result.exception!r}\n{result.output}")
        return result

    async def json(self, *args: str) -> Any:
        result = await self("--output", "json", *args)
        assert result.exit_code == 0, f"shoal {' '.join(args)}: {result.exit_code}\n{result.stderr}"
        return json.loads(result.stdout)


async def shoal_for(rest: Rest, workspace: str, *scopes: str) -> Shoal:
    headers = await rest.key(workspace, *scopes)
    return Shoal(str(rest.client.base_url).rstrip("/"), headers["Authorization"].removeprefix("Bearer "))


# ---- the contacts file reader (no network) ---------------------------------------------------


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_csv_rows_carry_their_line_numbers_and_malformed_rows_are_rejected(tmp_path: Path) -> None:
    csv_file = write(
        tmp_path / "c.csv",
        "\ufeffexternal_id,email,first_name,tags,status,custom.plan,custom.seats:number,"
        "custom.trial:bool,consent.email.newsletter\n"  # line 1
        "x1,a@example.com,Ada,vip;beta news,active,pro,5,yes,granted\n"  # 2
        "\n"  # 3: blank, skipped
        'x2,b@example.com,"Grace\nHopper",,,,,,\n'  # 4-5: one record over two lines
        "x3,c@example.com,too,few\n"  # 6
        "x4,d@example.com,Ed,,,,many,,\n"  # 7: not a number
        "x5,e@example.com,Al,,,,,maybe,\n",  # 8: not a boolean
    )
    with csv_file.open("ab") as fh:
        fh.write(b"x6,f@example.com,Bad\xff\xfe,,,,,,\n")  # 9: not UTF-8
        fh.write(b"x7,g@example.com,Last,,,,,,\n")  # 10
    source = ContactsFile.open(csv_file)
    rows = list(source.rows())
    assert [r.line for r in rows] == [2, 4, 6, 7, 8, 9, 10]
    assert source.count() == 7
    first = rows[0].contact
    assert first == {
        "external_id": "x1",
        "email": "a@example.com",
        "first_name": "Ada",
        "tags": ["vip", "beta", "news"],
        "status": "ACTIVE",
        "fields": {"plan": "pro", "seats": 5, "trial": True},
        "consents": [
            {"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "GRANTED", "source": "csv import"}
        ],
    }
    assert rows[1].contact == {"external_id": "x2", "email": "b@example.com", "first_name": "Grace\nHopper"}
    assert rows[2].reason == "expected 9 columns, found 4"
    assert (rows[3].field, rows[3].reason) == ("custom.seats", "'many' is not a number")
    assert rows[4].field == "custom.trial" and "not a boolean" in rows[4].reason
    assert rows[5].reason == "not valid UTF-8"
    assert rows[6].ok and rows[6].contact == {
        "external_id": "x7",
        "email": "g@example.com",
        "first_name": "Last",
    }


def test_jsonl_rows_bad_json_and_non_objects_are_rejected_rows(tmp_path: Path) -> None:
    jsonl = write(
        tmp_path / "c.jsonl",
        b'{"email": "a@example.com", "tags": ["x"]}\n'
        b"\n"
        b'{"email": "b@example.com"\n'
        b"[1, 2]\n"
        b'{"email": "\xff"}\n'
        b'{"external_id": "e5"}',
    )
    source = ContactsFile.open(jsonl)
    rows = list(source.rows())
    assert source.count() == 5
    assert [(r.line, r.ok) for r in rows] == [(1, True), (3, False), (4, False), (5, False), (6, True)]
    assert rows[1].reason.startswith("not valid JSON")
    assert rows[2].reason == "expected a JSON object, found list"
    assert rows[3].reason == "not valid UTF-8"
    assert rows[4].contact == {"external_id": "e5"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.csv", "email,nickname,custom.\n", "unknown column(s) nickname, custom."),
        ("twice.csv", "email,EMAIL,email\n", "column 'email' appears twice"),
        ("empty.csv", "", "expected a header row"),
        ("c.txt", "email\n", "expected a .csv or .jsonl file"),
    ],
)
def test_a_file_that_cannot_be_read_as_contacts_is_a_usage_error(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    # Refused before any request: the API URL points nowhere.
    path = write(tmp_path / name, text)
    result = CliRunner().invoke(app, ["--api-url", "http://127.0.0.1:9", "contacts", "import", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""


def test_bad_command_input_is_exit_2_without_a_traceback() -> None:
    runner = CliRunner()
    bad_json = runner.invoke(app, ["campaigns", "trigger", "x", "--data", "{nope"])
    assert bad_json.exit_code == 2 and "--data is not valid JSON" in bad_json.stderr
    not_object = runner.invoke(app, ["campaigns", "trigger", "x", "--data", "[1]"])
    assert not_object.exit_code == 2 and "--data must be a JSON object" in not_object.stderr
    chunk = runner.invoke(app, ["contacts", "import", "x.csv", "--chunk-size", "10001"])
    assert chunk.exit_code == 2
    assert "Traceback" not in bad_json.output + not_object.output + chunk.output


def test_shoal_keys_is_the_gateway_key_tool(tmp_path: Path) -> None:
    env = {"SHOAL_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}"}
    runner = CliRunner()
    created = runner.invoke(
        app,
        ["keys", "create", "--workspace", "ws_cli", "--scope", "campaigns:read", "--output", "json"],
        env=env,
    )
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)
    assert key["key"].startswith("shoal_") and key["workspace_id"] == "ws_cli"
    listed = runner.invoke(app, ["keys", "list", "--workspace", "ws_cli"], env=env)
    assert [(k["id"], k["revoked"]) for k in json.loads(listed.stdout)] == [(key["id"], False)]
    assert runner.invoke(app, ["keys", "revoke", key["id"]], env=env).exit_code == 0
    assert json.loads(runner.invoke(app, ["keys", "list", "--workspace", "ws_cli"], env=env).stdout)[0][
        "revoked"
    ]


def test_the_example_document_loads_and_broken_documents_are_usage_errors(tmp_path: Path) -> None:
    document = load(EXAMPLE_CAMPAIGN)
    condition = document.campaign.flow["steps"][1]["condition"]
    # `yes:` and `no:` are keys, not YAML 1.1 booleans.
    assert set(condition) == {"predicate", "yes", "no"}
    assert [t.name for t in document.templates] == ["welcome-email", "pro-tips-email"]

    runner = CliRunner()
    for text, message in [
        ("campaign: {name: x, trigger: {manual: {}}, flow: {steps: [}\n", "line 1, column"),
        ("campaign: {name: x, trigger: {manual: {}}, flow: {}}\nwidgets: []\n", "widgets: Extra inputs"),
        ("templates: []\n", "campaign: Field required"),
        ("campaign: {name: x, trigger: {manual: {}}, flow: {1: a}}\n", "the key 1 must be a string"),
    ]:
        path = write(tmp_path / "doc.yaml", text)
        result = runner.invoke(app, ["--api-url", "http://127.0.0.1:9", "apply", "-f", str(path)])
        assert result.exit_code == 2, (text, result.output)
        assert message in result.stderr, (text, result.stderr)
    missing = runner.invoke(app, ["apply", "-f", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "No such file" in missing.stderr


# ---- no API at all ---------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_console_script_an_unreachable_api_and_shoal_up() -> None:
    # The installed console script, as an operator runs it.
    script = shutil.which("shoal", path=str(Path(sys.executable).parent))
    assert script is not None, "the shoal console script is not installed (pip install -e .)"
    url = f"http://127.0.0.1:{_closed_port()}"
    proc = await asyncio.create_subprocess_exec(
        script,
        "campaigns",
        "list",
        env={"SHOAL_API_URL": url, "PATH": ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1
    assert out == b""
    assert f"cannot reach the Shoal API at {url}: connection refused" in err.decode()
    assert b"Traceback" not in err

    # `shoal up` is the runner itself: its usage errors, its exit code 2.
    proc = await asyncio.create_subprocess_exec(
        script, "up", "--only", "nope", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    assert "--only: unknown component(s) nope" in err.decode()

    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["--output", "json", "--api-url", url, "status", "3f2b9c1e-0000-4000-8000-000000000000"],
    )
    assert result.exit_code == 1 and result.stdout == ""
    error = json.loads(result.stderr)
    assert (error["error"], error["url"]) == ("unreachable", url)


# ---- operating a campaign --------------------------------------------------------------------


async def test_trigger_pause_resume_and_status_through_the_cli(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        segment_id, template_id = await seed(m, tag="cli")
        cid = await campaign(m, ws, template_id, segment_id=segment_id)
        shoal = await shoal_for(rest, ws, "campaigns:read", "campaigns:trigger", "campaigns:write")

        # Before the first run: DRAFT, nothing counted.
        status = await shoal.json("status", cid)
        assert (status["id"], status["state"], status["run_id"]) == (cid, "DRAFT", None)

        # Trigger with an idempotency key and data; the same key again is a replay of that run.
        triggered = await shoal.json(
            "campaigns", "trigger", cid, "--idempotency-key", "cli-1", "--data", '{"order": {"id": 7}}'
        )
        assert triggered["status"] == "RUNNING" and triggered["replayed"] is False
        again = await shoal("campaigns", "trigger", cid, "--idempotency-key", "cli-1")
        assert again.exit_code == 0, again.stderr
        assert triggered["run_id"] in again.stdout and "replay" in again.stdout
        # A second run while this one is in progress: 409 on stderr, exit 1, stdout empty.
        busy = await shoal("campaigns", "trigger", cid, "--idempotency-key", "cli-2")
        assert busy.exit_code == 1 and busy.stdout == ""
        assert "409 wrong_state" in busy.stderr and f"/v1/campaigns/{cid}/trigger" in busy.stderr

        async def sent() -> Any:
            status = await shoal.json("status", cid)
            return status if status["sent"] == 3 else None

        status = await wait_for(sent, timeout=20)
        assert (status["state"], status["run_id"]) == ("RUNNING", triggered["run_id"])
        assert set(status["counts"]) == {"pending", "processing", "completed", "failed", "skipped"}
        assert sum(status["counts"].values()) == 3

        # Text mode: the board and the one-line counts.
        text = await shoal("status", cid)
        assert text.exit_code == 0, text.stderr
        assert "RUNNING" in text.stdout and "pending" in text.stdout and "(of 3)" in text.stdout

        # Pause, pause again (409), resume, resume again (409).
        assert await shoal.json("campaigns", "pause", cid) == {"status": "PAUSED"}
        again = await shoal("campaigns", "pause", cid)
        assert again.exit_code == 1 and "409 wrong_state" in again.stderr
        assert (await shoal.json("status", cid))["state"] == "PAUSED"
        resumed = await shoal("campaigns", "resume", cid)
        assert resumed.exit_code == 0 and f"{cid}: RUNNING" in resumed.stdout
        again = await shoal("--output", "json", "campaigns", "resume", cid)
        assert again.exit_code == 1 and again.stdout == ""
        assert json.loads(again.stderr)["error"] == "wrong_state"

        # Watching a campaign that stays RUNNING (a long WAIT) gives up after --watch-timeout.
        watched = await shoal("status", cid, "--watch", "--interval", "0.1", "--watch-timeout", "0.5")
        assert watched.exit_code == 1 and "still RUNNING after 0.5s" in watched.stderr

        # Unknown campaign: 404; not a UUID: 400 is a usage error (exit 2) naming the field.
        missing = await shoal("status", "9a4c0d5e-0000-4000-8000-123456789abc")
        assert missing.exit_code == 1 and "404 not_found" in missing.stderr
        malformed = await shoal("campaigns", "pause", "not-a-uuid")
        assert malformed.exit_code == 2 and "400 validation_failed" in malformed.stderr
        assert "campaign_id" in malformed.stderr

        # A key without the scope: 403; a bad key: 401 with the API's message; no key: a hint.
        reader = await shoal_for(rest, ws, "campaigns:read")
        forbidden = await reader("campaigns", "pause", cid)
        assert forbidden.exit_code == 1 and "403 forbidden" in forbidden.stderr
        assert "campaigns:write" in forbidden.stderr
        bad = await shoal("status", cid, key="shoal_k" + "a" * 16 + "_" + "b" * 43)
        assert bad.exit_code == 1 and bad.stdout == ""
        assert "401 unauthorized: the API key is not valid" in bad.stderr
        assert "Traceback" not in bad.output
        none = await shoal("status", cid, key="")
        assert none.exit_code == 1 and "401 unauthorized" in none.stderr and "SHOAL_API_KEY" in none.stderr


# ---- contacts import -------------------------------------------------------------------------


@needs("POST /v1/contacts/import", "GET /v1/contacts")
async def test_contacts_import_reports_counts_and_rejected_lines(nats_url: str, tmp_path: Path) -> None:
    # A small body limit: the 60-row chunk is refused with 413 and sent again in halves.
    async with rest_mesh(nats_url, tmp_path, max_body_bytes=4096) as (m, rest):
        ws = m.workspace_id
        shoal = await shoal_for(rest, ws, "contacts:write")
        lines = ["external_id,email,first_name,tags,status,custom.plan"]
        lines += [f"bulk-{i},bulk{i}@example.com,Person{i},bulk,ACTIVE,free" for i in range(60)]
        lines += [
            "bad-email,not-an-email,Nobody,bulk,ACTIVE,free",  # line 62: rejected by the API
            "bad-status,ok@example.com,Somebody,bulk,SLEEPING,free",  # 63: rejected by the API
            "short,row",  # 64: wrong column count
        ]
        csv_file = write(tmp_path / "contacts.csv", "\n".join(lines) + "\n")
        rejects = tmp_path / "rejects.jsonl"
        summary = await shoal.json(
            "contacts", "import", str(csv_file), "--chunk-size", "1000", "--rejects", str(rejects)
        )
        assert (summary["rows"], summary["imported"], summary["updated"]) == (63, 60, 0), summary
        by_line = {r["line"]: r for r in summary["rejected"]}
        assert sorted(by_line) == [62, 63, 64], summary["rejected"]
        assert (by_line[62]["field"], by_line[63]["field"]) == ("email", "status")
        assert "not a valid email" in by_line[62]["reason"]
        assert by_line[64]["reason"] == "expected 6 columns, found 2"
        assert [json.loads(line)["line"] for line in rejects.read_text().splitlines()] == [62, 63, 64]

        # The contacts are there, with their tags and custom field.
        headers = await rest.key(ws, "contacts:read")
        listed = await rest.client.get("/v1/contacts", params={"tag": "bulk", "limit": 500}, headers=headers)
        assert listed.status_code == 200, listed.text
        items = listed.json()["items"]
        assert len(items) == 60
        ada = next(c for c in items if c["external_id"] == "bulk-7")
        assert (ada["email"], ada["first_name"], ada["fields"]) == (
            "bulk7@example.com",
            "Person7",
            {"plan": "free"},
        )

        # Again, in text mode, small chunks: everything is an update now.
        again = await shoal("contacts", "import", str(csv_file), "--chunk-size", "7")
        assert again.exit_code == 0, again.stderr
        assert "63 rows: 0 imported, 60 updated, 3 rejected" in again.stdout
        assert "expected 6 columns, found 2" in again.stdout

        # A row repeating the key of an earlier row of the same call is rejected by the API.
        dup = write(tmp_path / "dup.csv", "external_id,email\nd1,d1@example.com\nd1,d2@example.com\n")
        result = await shoal.json("contacts", "import", str(dup))
        assert result["imported"] == 1 and [r["line"] for r in result["rejected"]] == [3]
        assert "repeats" in result["rejected"][0]["reason"]

        # JSON Lines, with a malformed line among good ones.
        jsonl = write(
            tmp_path / "more.jsonl",
            '{"external_id": "j1", "email": "j1@example.com", "tags": ["jsonl"]}\n'
            "{oops\n"
            '{"external_id": "j2", "email": "j2@example.com", "tags": ["jsonl"], "nickname": "x"}\n',
        )
        result = await shoal.json("contacts", "import", str(jsonl))
        assert (result["imported"], [r["line"] for r in result["rejected"]]) == (1, [2, 3])

        # A key that may only read contacts cannot import: 403, exit 1.
        reader = await shoal_for(rest, ws, "contacts:read")
        refused = await reader("contacts", "import", str(jsonl))
        assert refused.exit_code == 1 and "403 forbidden" in refused.stderr


# ---- campaign-as-code ------------------------------------------------------------------------


@needs(
    "POST /v1/contacts/import",
    "GET /v1/templates",
    "POST /v1/templates",
    "PATCH /v1/templates/{template_id}",
    "POST /v1/templates/{template_id}/publish",
    "GET /v1/segments",
    "POST /v1/segments",
    "GET /v1/campaigns",
    "POST /v1/campaigns",
    "GET /v1/campaigns/{campaign_id}",
    "PATCH /v1/campaigns/{campaign_id}",
    "POST /v1/campaigns/{campaign_id}/start",
    "GET /v1/executions/{execution_id}",
)
async def test_apply_the_example_twice_start_it_and_watch_it_complete(
    nats_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=10_000))
        shoal = await shoal_for(rest, ws, "admin")
        imported = await shoal.json("contacts", "import", str(EXAMPLE_CONTACTS))
        assert imported["rejected"] == [] and imported["imported"] >= 4, imported

        # The plan, then the apply: everything created; then again: everything unchanged.
        plan = await shoal.json("apply", "-f", str(EXAMPLE_CAMPAIGN), "--dry-run")
        assert plan["dry_run"] is True
        assert {c["action"] for c in plan["changes"]} == {"create"}
        assert (await shoal.json("campaigns", "list")) == []
        first = await shoal.json("apply", "-f", str(EXAMPLE_CAMPAIGN))
        assert {c["action"] for c in first["changes"]} == {"created"}, first
        kinds = [c["kind"] for c in first["changes"]]
        assert kinds.count("segment") == 1 and kinds.count("campaign") == 1 and "template" in kinds
        second = await shoal.json("apply", "-f", str(EXAMPLE_CAMPAIGN))
        assert {c["action"] for c in second["changes"]} == {"unchanged"}, second
        assert [c["id"] for c in second["changes"]] == [c["id"] for c in first["changes"]]
        cid = next(c["id"] for c in first["changes"] if c["kind"] == "campaign")

        # A template edit makes a new version, published; the DRAFT campaign's flow is updated.
        edited = tmp_path / "edited.yaml"
        text = EXAMPLE_CAMPAIGN.read_text()
        assert "Welcome aboard" in text
        edited.write_text(text.replace("Welcome aboard", "Welcome on board"))
        changed = await shoal.json("apply", "-f", str(edited))
        actions = {(c["kind"], c["action"]) for c in changed["changes"]}
        assert ("template", "updated") in actions, changed
        assert "version 2, published" in " ".join(c["detail"] for c in changed["changes"])
        back = await shoal.json("apply", "-f", str(EXAMPLE_CAMPAIGN))
        assert ("template", "updated") in {(c["kind"], c["action"]) for c in back["changes"]}

        # campaigns list / get as JSON.
        listed = await shoal.json("campaigns", "list", "--state", "DRAFT")
        assert [c["id"] for c in listed] == [cid]
        got = await shoal.json("campaigns", "get", cid)
        assert (got["id"], got["state"]) == (cid, "DRAFT")
        assert "manual" in got["trigger"]
        text_get = await shoal("campaigns", "get", cid)
        assert text_get.exit_code == 0 and cid in text_get.stdout and "SEND" in text_get.stdout

        # --start launches it (everything else unchanged), then --watch follows it to the end.
        started = await shoal.json("apply", "-f", str(EXAMPLE_CAMPAIGN), "--start")
        assert ("campaign", "started") in {(c["kind"], c["action"]) for c in started["changes"]}, started
        watched = await shoal("status", cid, "--watch", "--interval", "0.2", "--watch-timeout", "60")
        assert watched.exit_code == 0, watched.stderr
        assert "COMPLETED" in watched.stdout
        final = await shoal.json("status", cid)
        assert final["state"] == "COMPLETED", final
        assert (
            final["counts"]["completed"] == imported["imported"] - 1
        )  # the newsletter-only contact is not in it
        assert (await shoal.json("campaigns", "list", "--state", "COMPLETED"))[0]["id"] == cid

        # Applying a changed flow to a campaign that is no longer DRAFT leaves it and says so.
        assert "onboarded-pro" in text
        late_flow = write(tmp_path / "late.yaml", text.replace("onboarded-pro", "onboarded-vip"))
        late = await shoal.json("apply", "-f", str(late_flow))
        skipped = next(c for c in late["changes"] if c["kind"] == "campaign")
        assert skipped["action"] == "skipped" and "COMPLETED" in skipped["detail"]
        assert any("only a DRAFT campaign" in note for note in late["notes"])

        # trace: the execution's trace id and its Jaeger link.
        executions = await m.execution.ListExecutions(
            epb.ListExecutionsRequest(workspace_id=ws, campaign_id=cid)
        )
        execution = executions.executions[0]
        assert execution.trace_id
        traced = await shoal("trace", execution.id, "--jaeger-url", "http://jaeger.test:16686/")
        assert traced.exit_code == 0, traced.stderr
        assert f"trace id: {execution.trace_id}" in traced.stdout
        assert f"http://jaeger.test:16686/trace/{execution.trace_id}" in traced.stdout
        as_json = await shoal.json("trace", execution.id, "--jaeger-url", "")
        assert (as_json["trace_id"], as_json["jaeger_url"]) == (execution.trace_id, None)
