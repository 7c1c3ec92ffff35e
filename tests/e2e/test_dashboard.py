"""The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright,
over the gateway and the real mesh (`rest_mesh`).

Scenario: sign in with a key; build a flow with a CONDITION and an AB_TEST through the UI (clicks,
typing, and the keyboard for one insertion), pick a template (and preview it) and a segment, see
the audience and the estimate, launch, watch the campaign complete, check the funnel against the
API's; then launch, pause and resume a second campaign (one with a long WAIT) with the buttons,
check that disabled actions carry their reason, follow an execution to its Jaeger trace link, and
see a refused key return to sign-in. Screenshots of the builder and the detail page go to
`SHOAL_SCREENSHOTS_DIR` (default `build/screenshots/`, git-ignored).

Skipped (visibly) where /usr/bin/chromium is missing: `.ci/run` installs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.keys import split_key
from shoal.bus import Bus
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import events_pb2 as ev
from tests.e2e.rest import Rest, rest_mesh
from tests.e2e.test_rest_campaigns import flow as long_wait_flow
from tests.e2e.test_thin_run import seed

CHROMIUM = "/usr/bin/chromium"
# The machine's closed network refuses Chromium's background connections; these keep it quiet.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
JAEGER = "http://jaeger.example.test:16686"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 15_000


def screenshots_dir() -> Path:
    target = Path(os.environ.get("SHOAL_SCREENSHOTS_DIR") or REPO / "build" / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)")


@asynccontextmanager
async def browser_page() -> AsyncIterator[tuple[Any, list[str]]]:
    """A fresh page in headless Chromium, and the list its uncaught script errors go to."""
    require_chromium()
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page, errors
        finally:
            await browser.close()


async def api(rest: Rest, headers: dict[str, str], path: str) -> Any:
    reply = await rest.client.get(path, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_dashboard_builds_launches_and_operates_campaigns(
    nats_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    # `spans` turns tracing on, so executions carry the trace ids the page links to.
    shots = screenshots_dir()
    async with (
        browser_page() as (page, errors),
        rest_mesh(nats_url, tmp_path, jaeger_url=JAEGER) as (m, rest),
    ):
        from playwright.async_api import expect

        ws = m.workspace_id
        segment_id, template_id = await seed(m, tag="dash")
        headers = await rest.key(
            ws, "campaigns:write", "campaigns:trigger", "templates:read", "contacts:read", "billing:write"
        )
        api_key = headers["Authorization"].removeprefix("Bearer ")
        base = str(rest.client.base_url).rstrip("/")
        try:
            # ---- sign in --------------------------------------------------------------------------
            await page.goto(f"{base}/dashboard/")
            await page.get_by_label("API key").fill("shoal_not_a_key")
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("alert")).to_contain_text("not valid")
            await page.get_by_label("API key").fill(api_key)
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("heading", name="Campaigns", exact=True)).to_be_visible()
            assert await page.evaluate("sessionStorage.getItem('shoal.apiKey')") == api_key

            # ---- create, then build the flow ----------------------------------------------------------
            await page.get_by_label("Name").fill("Dashboard welcome")
            await page.get_by_role("button", name="Create campaign").click()
            await expect(page.get_by_role("heading", name=re.compile("Edit campaign"))).to_be_visible()
            cid = page.url.split("#/campaigns/")[1].split("/")[0]

            # SEND before the END the new flow starts with (mouse).
            await page.get_by_role("button", name="Insert a step at position 1 of main sequence").click()
            await page.get_by_role("menuitem", name=re.compile("^SEND")).click()
            s1 = page.locator("#node-s1")
            # Validation problems show on the step they belong to: no template yet.
            await page.get_by_role("button", name="Validate").click()
            await expect(s1.locator(".node-errors")).to_contain_text("template")
            await expect(s1).to_have_attribute("aria-describedby", re.compile("errs-"))
            await expect(s1.locator(f'option[value="{template_id}"]')).to_have_count(1)
            await s1.get_by_label("Template (published)").select_option(template_id)
            await s1.get_by_role("button", name="Preview").click()
            preview = page.get_by_role("dialog", name=re.compile("Preview of"))
            await expect(preview).to_contain_text("Subject: Welcome Ada")
            await preview.get_by_role("button", name="Close").click()
            await expect(preview).to_be_hidden()

            # CONDITION after the SEND (keyboard only): focus "+", Enter, arrows, Enter.
            await page.get_by_role("button", name="Insert a step at position 2 of main sequence").focus()
            await page.keyboard.press("Enter")
            await expect(page.get_by_role("menuitem", name=re.compile("^SEND"))).to_be_focused()
            await page.keyboard.press("ArrowDown")
            await page.keyboard.press("ArrowDown")
            await expect(page.get_by_role("menuitem", name=re.compile("^CONDITION"))).to_be_focused()
            await page.keyboard.press("Enter")
            c1 = page.locator("#node-c1")
            await expect(c1).to_be_visible()
            await expect(page.locator("#node-c1 >> text=Yes").first).to_be_visible()
            await c1.get_by_label("Condition of c1").select_option("field")
            await c1.get_by_label("Field", exact=True).fill("first_name")
            await c1.get_by_label("Operator").select_option("eq")
            await c1.get_by_label("Value").fill("Ada")

            # AB_TEST in the no branch; what followed (its END) moves into variant A.
            await page.get_by_role("button", name="Insert a step at position 1 of no branch of c1").click()
            await page.get_by_role("menuitem", name=re.compile("^AB_TEST")).click()
            ab = page.locator("#node-ab1")
            await expect(ab).to_be_visible()
            # A SEND in variant A as well.
            await page.get_by_role("button", name="Insert a step at position 1 of variant A of ab1").click()
            await page.get_by_role("menuitem", name=re.compile("^SEND")).click()
            s2 = page.locator("#node-s2")
            await expect(s2.locator(f'option[value="{template_id}"]')).to_have_count(1)
            await s2.get_by_label("Template (published)").select_option(template_id)
            # Weights must sum to 100: 50 + 40 is refused on the spot, 50 + 50 passes.
            weight_b = ab.get_by_label("Variant 2 weight (%)")
            await weight_b.fill("40")
            await expect(ab.locator(".weight-sum")).to_have_text("Weights sum to 90; they must sum to 100")
            await expect(weight_b).to_have_attribute("aria-invalid", "true")
            await weight_b.fill("50")
            await weight_b.press("Tab")
            await expect(page.locator("#node-ab1 .weight-sum")).to_have_text("Weights sum to 100 ✓")

            # A move that the flow rules forbid is disabled with its reason.
            end_up = page.get_by_role("button", name="Move step e1 up")
            await expect(end_up).to_be_disabled()
            assert "last step" in (await end_up.get_attribute("title") or "")

            # Trigger settings: the API trigger shows its endpoint and a key hint; a schedule offers
            # the browser's IANA zones. Back to manual before saving.
            await page.get_by_label("API (your backend triggers runs)").check()
            await expect(page.get_by_test_id("trigger-endpoint")).to_have_text(
                f"POST {base}/v1/campaigns/{cid}/trigger"
            )
            # The secret may itself hold "_" (token_urlsafe), so the key is split as the gateway does.
            parts = split_key(api_key)
            assert parts is not None
            key_id, secret = parts
            await expect(page.get_by_text("campaigns:trigger scope")).to_contain_text(key_id)
            assert secret not in await page.content()
            await page.get_by_label("Scheduled (date, time and time zone)").check()
            zone = page.get_by_label("Time zone (IANA)")
            await expect(zone.locator('option[value="Europe/Paris"]')).to_have_count(1)
            await zone.select_option("Europe/Paris")
            await page.get_by_label("Manual (an operator launches it)").check()

            # ---- segment, audience, save, validate, estimate ----------------------------------------
            await page.get_by_label("Segment (audience)").select_option(segment_id)
            await expect(page.get_by_test_id("audience")).to_have_text("Audience: 3 contacts")
            await page.get_by_role("button", name="Save", exact=True).click()
            await expect(page.get_by_text("All changes saved")).to_be_visible()
            await expect(page.get_by_test_id("valid")).to_be_visible()
            estimate = await api(rest, headers, f"/v1/campaigns/{cid}/estimate")
            assert estimate["audience_size"] == 3 and estimate["expected_cost_cents"] > 0
            await expect(page.locator('[data-figure="audience"]')).to_have_text("3")
            expected = await page.locator('[data-figure="expected"]').inner_text()
            upper = await page.locator('[data-figure="upper"]').inner_text()
            assert re.search(r"\d", expected) and re.search(r"\d", upper), (expected, upper)
            saved = await api(rest, headers, f"/v1/campaigns/{cid}")
            flow_ids = re.findall(r"'id': '([^']+)'", str(saved["flow"]))
            assert flow_ids == ["s1", "c1", "e1", "ab1", "s2", "e2", "e3"], flow_ids
            await page.screenshot(path=str(shots / "builder.png"), full_page=True)

            # ---- launch and watch it complete ---------------------------------------------------------
            await page.get_by_role("button", name="Launch").click()
            await expect(page.get_by_test_id("campaign-state")).to_have_text("COMPLETED", timeout=30_000)
            funnel = await api(rest, headers, f"/v1/campaigns/{cid}/funnel")
            assert funnel["executions"] == 3
            for node in funnel["nodes"]:
                row = page.locator(f'table.funnel tr[data-node="{node["node_id"]}"]')
                await expect(row.locator('[data-metric="entered"]')).to_have_attribute(
                    "data-value", str(node["entered"])
                )
                if node["sent"] is not None:
                    await expect(row.locator('[data-metric="sent"]')).to_have_attribute(
                        "data-value", str(node["sent"])
                    )
                if node["condition"]:
                    for branch in ("yes", "no"):
                        await expect(row.locator(f'[data-metric="{branch}"]')).to_have_attribute(
                            "data-value", str(node["condition"][branch])
                        )
                for variant in node["variants"] or []:
                    await expect(row.locator(f'[data-variant="{variant["name"]}"]')).to_have_attribute(
                        "data-value", str(variant["count"])
                    )
            by_id = {n["node_id"]: n for n in funnel["nodes"]}
            assert by_id["c1"]["condition"] == {"yes": 1, "no": 2}
            await expect(page.locator('[data-count="completed"] dd').first).to_have_text("3")
            await expect(page.get_by_test_id("history")).to_contain_text("COMPLETED")
            # Illegal actions are disabled and say why.
            pause = page.locator('button[data-action="pause"]')
            await expect(pause).to_be_disabled()
            assert (
                await pause.get_attribute("title")
                == "Only a RUNNING campaign can be paused; this one is COMPLETED."
            )
            assert await pause.get_attribute("aria-description") == await pause.get_attribute("title")
            # An execution links to its trace in Jaeger, from the list and by id.
            execution = (await api(rest, headers, f"/v1/campaigns/{cid}/executions"))["items"][0]
            link = page.locator(f'tr[data-execution="{execution["id"]}"] a.trace-link')
            await expect(link).to_have_attribute("href", f"{JAEGER}/trace/{execution['trace_id']}")
            await page.get_by_label("Execution id").fill(execution["id"])
            await page.get_by_role("button", name="Look up").click()
            detail = page.get_by_role("region", name=f"Execution {execution['id']}")
            await expect(detail).to_contain_text(execution["contact_id"])
            await expect(detail.locator("a.trace-link")).to_have_attribute(
                "href", f"{JAEGER}/trace/{execution['trace_id']}"
            )
            await page.screenshot(path=str(shots / "detail.png"), full_page=True)
            # Launched, the flow is read-only: no insertion, no editing.
            await page.get_by_role("link", name="View the flow →").click()
            await expect(page.get_by_text("only a DRAFT can be edited")).to_be_visible()
            await expect(page.locator("#node-ab1")).to_be_visible()
            await expect(page.locator("button.insert")).to_have_count(0)
            await expect(page.get_by_label("Variant 2 weight (%)")).to_be_disabled()
            await page.go_back()
            await expect(page.get_by_test_id("campaign-state")).to_have_text("COMPLETED")

            # ---- a second campaign: launch, pause and resume with the buttons ---------------------------
            made = await m.campaign.CreateCampaign(
                cpb.CreateCampaignRequest(
                    workspace_id=ws,
                    name="Long wait",
                    segment_id=segment_id,
                    trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
                    flow=long_wait_flow(template_id),
                )
            )
            second = made.campaign.id
            await page.goto(f"{base}/dashboard/#/campaigns")
            row = page.locator(f'tr[data-campaign="{second}"]')
            await expect(row).to_contain_text("DRAFT")
            await row.get_by_role("link", name="Long wait", exact=True).click()
            state = page.get_by_test_id("campaign-state")
            await expect(state).to_have_text("DRAFT")
            resume = page.locator('button[data-action="resume"]')
            assert (
                await resume.get_attribute("title")
                == "Only a paused campaign can be resumed; this one is DRAFT."
            )
            await page.locator('button[data-action="start"]').click()
            await expect(state).to_have_text("RUNNING")
            await expect(page.locator('[data-count="pending"] dd').first).to_have_text("3", timeout=20_000)
            await page.locator('button[data-action="pause"]').click()
            await expect(state).to_have_text("PAUSED")
            await expect(page.locator('button[data-action="pause"]')).to_have_attribute(
                "title", "The campaign is already PAUSED."
            )
            await expect(page.get_by_text("Paused by an operator")).to_be_visible()
            assert (await api(rest, headers, f"/v1/campaigns/{second}/status"))["state"] == "PAUSED"
            await page.locator('button[data-action="resume"]').click()
            await expect(state).to_have_text("RUNNING")
            assert (await api(rest, headers, f"/v1/campaigns/{second}/status"))["state"] == "RUNNING"
            await expect(page.get_by_test_id("history")).to_contain_text("PAUSED")
            # Billing says the balance ran out: PAUSED_BALANCE, with what to do (top up) before resume.
            bus = await Bus.connect(nats_url, name="test-dashboard", namespace=m.namespace)
            try:
                exhausted = ev.BalanceEvent(workspace_id=ws, free_cents=0, campaign_ids=[second])
                await bus.publish(bus.event_subject("billing", "balance_exhausted"), exhausted)
            finally:
                await bus.close()
            await expect(state).to_have_text("PAUSED_BALANCE", timeout=10_000)
            help_box = page.get_by_role("region", name="Paused: the free balance ran out")
            await expect(help_box).to_contain_text("Top up the balance first, then resume")
            await help_box.get_by_label("Top-up amount (EUR, at least 10)").fill("5")
            await help_box.get_by_role("button", name="Top up").click()
            await expect(help_box.get_by_role("status")).to_have_text("A top-up is at least €10.00.")
            before = (await api(rest, headers, "/v1/billing/balance"))["free_cents"]
            await help_box.get_by_label("Top-up amount (EUR, at least 10)").fill("20")
            await help_box.get_by_role("button", name="Top up").click()
            await expect(help_box.get_by_role("status")).to_contain_text("Topped up €20.00")
            assert (await api(rest, headers, "/v1/billing/balance"))["free_cents"] == before + 2000
            await page.locator('button[data-action="resume"]').click()
            await expect(state).to_have_text("RUNNING")
            await expect(help_box).to_have_count(0)
            # The list shows it live.
            await page.goto(f"{base}/dashboard/#/campaigns?state=RUNNING")
            await expect(page.locator(f'tr[data-campaign="{second}"]')).to_have_attribute(
                "data-state", "RUNNING"
            )
            await expect(page.locator(f'tr[data-campaign="{cid}"]')).to_have_count(0)
            await page.goto(f"{base}/dashboard/#/campaigns")
            listed = page.locator(f'tr[data-campaign="{cid}"]')
            await expect(listed).to_have_attribute("data-state", "COMPLETED")
            await expect(listed.locator('[data-count="completed"]')).to_have_text("3")
            await expect(page.locator(f'tr[data-campaign="{second}"] [data-count="pending"]')).to_have_text(
                "3"
            )
            await page.screenshot(path=str(shots / "campaigns.png"), full_page=True)

            # ---- a refused key goes back to sign-in; the key never was in a URL ----------------------------
            assert api_key not in page.url
            await page.evaluate("sessionStorage.setItem('shoal.apiKey', 'shoal_kzzzzzzzzzzzzzzzz_nope')")
            await page.reload()
            await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            await expect(page.get_by_role("alert")).to_contain_text("401")
            assert await page.evaluate("sessionStorage.getItem('shoal.apiKey')") is None
        except BaseException as exc:
            await page.screenshot(path=str(shots / "failure.png"), full_page=True)
            if errors:
                exc.add_note(f"script errors in the page: {errors}")
            raise
        assert errors == [], errors
    for name in ("builder.png", "detail.png", "campaigns.png"):
        shot = shots / name
        assert shot.exists() and shot.stat().st_size > 10_000, shot


async def test_dashboard_files_and_config_need_no_key(tmp_path: Path) -> None:
    """The page, its modules and config.json are served without a key (the API calls carry it);
    only files of the static folder are served, by name."""
    import httpx

    from gateway.app import create_app
    from gateway.config import GatewaySettings

    app = create_app(GatewaySettings.load(data_dir=tmp_path, jaeger_url="https://jaeger.example.test/"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        redirect = await client.get("/dashboard")
        assert (redirect.status_code, redirect.headers["location"]) == (307, "/dashboard/")
        page = await client.get("/dashboard/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="app.js">' in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        for name in (
            "app.js",
            "api.js",
            "builder.js",
            "campaigns.js",
            "detail.js",
            "editor.js",
            "actions.js",
            "dom.js",
        ):
            module = await client.get(f"/dashboard/{name}")
            assert module.status_code == 200, name
            assert module.headers["content-type"].startswith("text/javascript"), name
        css = await client.get("/dashboard/style.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        config = await client.get("/dashboard/config.json")
        assert (config.status_code, config.json()) == (200, {"jaeger_url": "https://jaeger.example.test"})
        for missing in ("/dashboard/nope.js", "/dashboard/..%2Fapp.py", "/dashboard/%2e%2e%2fconfig.py"):
            assert (await client.get(missing)).status_code == 404, missing
        # Not part of the API's contract.
        assert not any(p.startswith("/dashboard") for p in app.openapi()["paths"])
