"""`shoal`: the command line for operators and scripts.

Everything but `shoal up` and `shoal keys` goes through the REST API (`shoal.cli.client`), never
to a service's gRPC port or database. `shoal up` is the mesh runner (`python -m shoal.runner`),
`shoal keys` the gateway's key store tool (`python -m gateway.keys`): the runner's own entry
point and the key tool's typer app, reused as they are.

The API address, key and output format come from `--api-url` / `--api-key` / `--output` (given
before or after the subcommand), else SHOAL_API_URL / SHOAL_API_KEY / SHOAL_OUTPUT, else
http://127.0.0.1:8080, no key, text.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.keys import cli as keys_cli
from shoal.cli import apply as apply_mod
from shoal.cli import render
from shoal.cli.client import ApiError, ShoalClient
from shoal.cli.config import (
    DEFAULT_API_URL,
    DEFAULT_JAEGER_URL,
    DEFAULT_TIMEOUT,
    ENV_API_KEY,
    ENV_API_URL,
    ENV_JAEGER_URL,
    ENV_OUTPUT,
    Output,
    Settings,
    jaeger_url,
)
from shoal.cli.contacts_file import ContactsFile
from shoal.cli.importer import DEFAULT_CHUNK, MAX_CHUNK, Importer, Summary
from shoal.cli.ui import UI, Failure, UsageProblem

LIVE_STATES = frozenset({"RUNNING", "SCHEDULED"})

app = typer.Typer(
    name="shoal",
    help="Shoal from the command line: campaigns, contacts, campaign-as-code, and the local mesh.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback's locals would print the API key.
    pretty_exceptions_show_locals=False,
)
campaigns_app = typer.Typer(help="List, inspect and operate campaigns.", no_args_is_help=True)
contacts_app = typer.Typer(help="Contacts: bulk import.", no_args_is_help=True)
app.add_typer(campaigns_app, name="campaigns")
app.add_typer(contacts_app, name="contacts")
app.add_typer(
    keys_cli,
    name="keys",
    help="Manage API keys in the gateway's local key store (run where the gateway keeps its data).",
)


@app.command(
    "up",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def up(ctx: typer.Context) -> None:
    """Start the whole mesh here (NATS, sandbox, services, gateway); Ctrl-C stops it all.

    The runner itself, `python -m shoal.runner` (what `make run` starts), with these arguments:
    `shoal up --help` lists its options (--fresh, --data-dir, --ports auto, --only ...).
    """
    # Replaced by the runner's own entry point rather than calling it in this process: the
    # runner recognises a live runner by its command line (`shoal.runner`), and a second runner
    # on the same data folder must see this one.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "shoal.runner", *ctx.args])  # noqa: S606


# ---- options every API command takes ---------------------------------------------------------

OutputOpt = Annotated[
    Output | None,
    typer.Option(
        "--output", "-o", help=f"text or json (default: {ENV_OUTPUT}, else text)", show_default=False
    ),
]
ApiUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        help=f"The API base URL (default: {ENV_API_URL}, else {DEFAULT_API_URL})",
        show_default=False,
    ),
]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", help=f"The API key (default: {ENV_API_KEY})", show_default=False)
]


@app.callback()
def main(
    ctx: typer.Context,
    api_url: Annotated[
        str, typer.Option("--api-url", envvar=ENV_API_URL, help="The API base URL.")
    ] = DEFAULT_API_URL,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar=ENV_API_KEY, help="The API key (shoal_...).", show_default=False),
    ] = None,
    output: Annotated[
        Output, typer.Option("--output", "-o", envvar=ENV_OUTPUT, help="text, or json on stdout.")
    ] = Output.TEXT,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each API answer.")
    ] = DEFAULT_TIMEOUT,
) -> None:
    ctx.obj = Settings(api_url=api_url, api_key=api_key or None, output=output, timeout=timeout)


def _ui(ctx: typer.Context, output: Output | None, api_url: str | None, api_key: str | None) -> UI:
    """The settings of this command: its own flags over the ones given before it."""
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    settings = Settings(
        api_url=api_url or base.api_url,
        api_key=api_key or base.api_key,
        output=output or base.output,
        timeout=base.timeout,
    )
    return UI.make(settings)


# ---- campaigns -------------------------------------------------------------------------------

CampaignId = Annotated[str, typer.Argument(help="Campaign id (a UUID).", show_default=False)]


@campaigns_app.command("list")
def campaigns_list(
    ctx: typer.Context,
    *,
    state: Annotated[
        str | None, typer.Option("--state", help="Only campaigns in this state (RUNNING, DRAFT, ...).")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many.")] = None,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """The workspace's campaigns (every page)."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard(), ui.client() as client:
        items = client.list_campaigns(state=state.upper() if state else None, limit=limit)
        if ui.json_mode:
            ui.emit(items)
        elif not items:
            ui.say("no campaigns" + (f" in state {state.upper()}" if state else ""))
        else:
            ui.out.print(render.campaigns_table(items))


@campaigns_app.command("get")
def campaigns_get(
    ctx: typer.Context,
    *,
    campaign_id: CampaignId,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """One campaign: its state, trigger and flow."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard(), ui.client() as client:
        campaign = client.get_campaign(campaign_id)
        if ui.json_mode:
            ui.emit(campaign)
        else:
            ui.out.print(render.campaign_detail(campaign))


@campaigns_app.command("start")
def campaigns_start(
    ctx: typer.Context,
    *,
    campaign_id: CampaignId,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Launch a DRAFT campaign now (manual start)."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard(), ui.client() as client:
        reply = client.start_campaign(campaign_id)
        if ui.json_mode:
            ui.emit(reply)
        else:
            run_id = reply.get("run_id") or reply.get("current_run_id")
            ui.say(
                f"started {campaign_id}: {render.text(reply.get('state') or reply.get('status'))}"
                + (f", run {run_id}" if run_id else "")
            )


def _json_object(raw: str) -> dict[str, Any]:
    """`--data`: a JSON object, inline or `@file.json`."""
    source = raw
    if raw.startswith("@"):
        try:
            source = Path(raw[1:]).read_text()
        except OSError as exc:
            raise UsageProblem(f"--data {raw}: {exc.strerror or exc}") from None
    try:
        value = json.loads(source)
    except ValueError as exc:
        raise UsageProblem(f"--data is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageProblem("--data must be a JSON object ({...})")
    return value


@campaigns_app.command("trigger")
def campaigns_trigger(
    ctx: typer.Context,
    *,
    campaign_id: CampaignId,
    recipient: Annotated[
        list[str] | None,
        typer.Option(
            "--recipient", "-r", help="A contact id (c_...); repeat for several. Default: the segment."
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="A JSON object for the templates, or @file.json.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Repeat safely: the same key returns the same run."),
    ] = None,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Start a run of an API-triggered campaign."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard():
        body: dict[str, Any] = {}
        if recipient:
            body["recipients"] = list(recipient)
        if data is not None:
            body["data"] = _json_object(data)
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        with ui.client() as client:
            reply, replayed = client.trigger_campaign(campaign_id, body)
        if ui.json_mode:
            ui.emit({**reply, "replayed": replayed})
            return
        ui.say(f"triggered {campaign_id}: run {reply.get('run_id')} {reply.get('status', '')}".rstrip())
        if replayed:
            ui.say("(a replay: this idempotency key already started that run)")


@campaigns_app.command("pause")
def campaigns_pause(
    ctx: typer.Context,
    *,
    campaign_id: CampaignId,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Pause a running campaign (executions inside a node finish that node)."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard(), ui.client() as client:
        reply = client.pause_campaign(campaign_id)
        if ui.json_mode:
            ui.emit(reply)
        else:
            ui.say(f"{campaign_id}: {reply.get('status', 'PAUSED')}")


@campaigns_app.command("resume")
def campaigns_resume(
    ctx: typer.Context,
    *,
    campaign_id: CampaignId,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Resume a paused campaign (pending executions are queued again)."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard(), ui.client() as client:
        reply = client.resume_campaign(campaign_id)
        if ui.json_mode:
            ui.emit(reply)
        else:
            ui.say(f"{campaign_id}: {reply.get('status', 'RUNNING')}")


# ---- status ----------------------------------------------------------------------------------


def _watch(
    ui: UI, client: ShoalClient, campaign_id: str, interval: float, timeout: float | None
) -> dict[str, Any]:
    """Poll until the campaign is no longer RUNNING (or SCHEDULED); the last status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    status = client.campaign_status(campaign_id)

    def live() -> bool:
        return str(status.get("state")) in LIVE_STATES

    def next_status() -> dict[str, Any]:
        if deadline is not None and time.monotonic() >= deadline:
            raise Failure(
                f"{campaign_id} still {status.get('state')} after {timeout:g}s; {render.counts_line(status)}"
            )
        time.sleep(interval)
        return client.campaign_status(campaign_id)

    if ui.json_mode or not ui.out.is_terminal:
        # Nothing to animate: poll quietly, the caller prints the final status.
        while live():
            status = next_status()
        return status
    try:
        with Live(render.status_board(status), console=ui.out, refresh_per_second=4) as board:
            while live():
                status = next_status()
                board.update(render.status_board(status))
    except KeyboardInterrupt:
        ui.say(render.counts_line(status))
        raise
    return status


@app.command("status")
def status_cmd(
    ctx: typer.Context,
    *,
    campaign_id: CampaignId,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until the campaign leaves RUNNING (or Ctrl-C).")
    ] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")] = 1.0,
    watch_timeout: Annotated[
        float | None,
        typer.Option("--watch-timeout", min=0.1, help="Give up watching after this many seconds (exit 1)."),
    ] = None,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """A campaign's state and its executions by state; --watch follows it live."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard(), ui.client() as client:
        if watch:
            status = _watch(ui, client, campaign_id, interval, watch_timeout)
        else:
            status = client.campaign_status(campaign_id)
        if not ui.json_mode and not (watch and ui.out.is_terminal):
            ui.out.print(render.status_board(status))
        if ui.json_mode:
            ui.emit(status)
        else:
            ui.say(render.counts_line(status))


# ---- trace -----------------------------------------------------------------------------------


@app.command("trace")
def trace_cmd(
    ctx: typer.Context,
    *,
    execution_id: Annotated[str, typer.Argument(help="Execution id.", show_default=False)],
    jaeger: Annotated[
        str | None,
        typer.Option(
            "--jaeger-url",
            help=f"The Jaeger UI (default: {ENV_JAEGER_URL}, else {DEFAULT_JAEGER_URL}; empty: no link).",
            show_default=False,
        ),
    ] = None,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """The trace id of an execution, and its Jaeger link (SHOAL_JAEGER_URL; empty turns it off)."""
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard(), ui.client() as client:
        execution = client.get_execution(execution_id)
        trace_id = execution.get("trace_id") or None
        base = jaeger_url() if jaeger is None else (jaeger.strip().rstrip("/") or None)
        link = f"{base}/trace/{trace_id}" if base and trace_id else None
        if ui.json_mode:
            ui.emit({**execution, "trace_id": trace_id, "jaeger_url": link})
            return
        ui.out.print(
            render.key_values(
                f"Execution {execution_id}",
                [(k, v) for k, v in execution.items() if not isinstance(v, dict | list) and k != "trace_id"],
            )
        )
        sends = [s for s in execution.get("sends") or [] if isinstance(s, dict)]
        if sends:
            ui.out.print(render.sends_table(sends))
        if trace_id is None:
            ui.say("trace id: - (no trace was recorded for this execution)")
            return
        ui.say(f"trace id: {trace_id}")
        if link:
            ui.say(f"jaeger: {link}")


# ---- contacts --------------------------------------------------------------------------------


def _print_summary(ui: UI, summary: Summary, rejects_file: Path | None) -> None:
    if ui.json_mode:
        ui.emit({**summary.as_json(), "rejects_file": str(rejects_file) if rejects_file else None})
        return
    ui.say(
        f"{summary.rows:,} rows: {summary.imported:,} imported, {summary.updated:,} updated, "
        f"{len(summary.rejected):,} rejected"
    )
    if summary.rejected:
        table = Table(title="Rejected rows", title_justify="left")
        table.add_column("line", justify="right", no_wrap=True)
        table.add_column("field", no_wrap=True)
        table.add_column("reason")
        shown = sorted(summary.rejected, key=lambda r: r.line)
        for rejected in shown[:50]:
            table.add_row(str(rejected.line), rejected.field or "-", rejected.reason)
        ui.out.print(table)
        if len(shown) > 50:
            ui.say(
                f"... and {len(shown) - 50:,} more"
                + ("" if rejects_file else " (--rejects FILE keeps them all)")
            )
    if rejects_file:
        ui.say(f"rejected rows written to {rejects_file}")


def _write_rejects(path: Path, summary: Summary) -> None:
    with path.open("w") as fh:
        for rejected in sorted(summary.rejected, key=lambda r: r.line):
            fh.write(json.dumps(rejected.as_json()) + "\n")


@contacts_app.command("import")
def contacts_import(
    ctx: typer.Context,
    *,
    file: Annotated[
        Path, typer.Argument(help="A .csv (with a header row) or .jsonl file.", show_default=False)
    ],
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, max=MAX_CHUNK, help="Contacts per API call.")
    ] = DEFAULT_CHUNK,
    rejects: Annotated[
        Path | None,
        typer.Option("--rejects", help="Write rejected rows here (JSON Lines: line, field, reason)."),
    ] = None,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Create or update contacts from a file of any size (matched by external_id, else email).

    CSV columns: external_id, email, phone, first_name, last_name, tags (separated by spaces or
    ;), status, and custom.NAME for custom fields. JSON Lines: one contact object per line.
    Exit 0 even when rows were rejected (they are listed); 1 or 2 when the import itself failed.
    """
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard():
        source = ContactsFile.open(file)
        with ui.client() as client:
            if ui.json_mode or not ui.err.is_terminal:
                summary = Importer(client, chunk_size=chunk_size).run(source.rows())
            else:
                total = source.count()
                columns = (
                    TextColumn("importing {task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("rows"),
                    TimeElapsedColumn(),
                )
                with Progress(*columns, console=ui.err, transient=True) as progress:
                    task = progress.add_task(file.name, total=total)
                    importer = Importer(
                        client, chunk_size=chunk_size, on_rows=lambda n: progress.advance(task, n)
                    )
                    summary = importer.run(source.rows())
        if rejects is not None:
            _write_rejects(rejects, summary)
        _print_summary(ui, summary, rejects)


# ---- apply -----------------------------------------------------------------------------------


@app.command("apply")
def apply_cmd(
    ctx: typer.Context,
    *,
    file: Annotated[
        Path, typer.Option("--file", "-f", help="The campaign document (YAML).", show_default=False)
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; change nothing.")] = False,
    start: Annotated[bool, typer.Option("--start", help="Launch the campaign after applying.")] = False,
    output: OutputOpt = None,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Campaign-as-code: create or update the templates, segment and campaign a YAML file declares.

    Idempotent: what exists unchanged is left alone; a template edit makes a new version and
    publishes it; a campaign's flow changes only while it is DRAFT.
    """
    ui = _ui(ctx, output, api_url, api_key)
    with ui.guard():
        document = apply_mod.load(file)
        with ui.client() as client:
            applier = apply_mod.Applier(client, document)
            try:
                result = applier.run(dry_run=dry_run, start=start)
            except (ApiError, Failure):
                if applier.result.changes and not ui.json_mode:
                    ui.out.print(apply_mod.result_table(applier.result, failed=True))
                raise
        if ui.json_mode:
            ui.emit(result.as_json())
        else:
            ui.out.print(apply_mod.result_table(result))
            for note in result.notes:
                ui.say(note)
