// The campaign list: state, trigger kind, counts and live progress (status polled every ~2 s while
// a campaign is RUNNING), filtered by state; and the form that creates a DRAFT.

import { get, post } from "./api.js";
import { announce, count, errorText, field, fill, h, select, stateBadge, triggerKind } from "./dom.js";

export const STATES = ["DRAFT", "SCHEDULED", "RUNNING", "PAUSED", "PAUSED_ERROR", "PAUSED_BALANCE", "COMPLETED", "COMPLETED_PARTIAL", "ARCHIVED"];
const POLL_MS = 2000;
const LIVE = ["RUNNING"];

function progress(status) {
  const c = status?.counts || {};
  const total = ["pending", "processing", "completed", "failed", "skipped"].reduce((n, k) => n + (c[k] || 0), 0);
  const done = (c.completed || 0) + (c.failed || 0) + (c.skipped || 0);
  return { total, done };
}

export async function campaignsView(main, { navigate, query }) {
  const state = query.get("state") || "";
  const filter = select([["", "All states"], ...STATES.map((s) => [s, s])], state);
  filter.addEventListener("change", () => navigate(filter.value ? `#/campaigns?state=${filter.value}` : "#/campaigns"));

  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "campaigns" },
    h("caption", { class: "visually-hidden" }, "Campaigns with their state, trigger, executions and progress"),
    h(
      "thead",
      {},
      h("tr", {}, ["Name", "State", "Trigger", "Pending", "Processing", "Completed", "Failed", "Skipped", "Sent", "Progress", ""].map((c, i) =>
        h("th", { scope: "col", class: i >= 3 && i <= 8 ? "num" : "" }, c || h("span", { class: "visually-hidden" }, "Links"))),
      ),
    ),
    tbody,
  );
  const more = h("button", { type: "button", hidden: true }, "Load more");
  const status = h("p", { class: "form-status", role: "status" });
  const rows = new Map(); // campaign id -> {summary, row, status}
  let cursor = null;
  let timer = null;
  let stopped = false;

  function renderRow(entry) {
    const { summary, status: st } = entry;
    const live = st?.state || summary.state;
    const c = st?.counts || {};
    const { total, done } = progress(st);
    const cells = [
      h("th", { scope: "row" }, h("a", { href: `#/campaigns/${summary.id}` }, summary.name)),
      h("td", {}, stateBadge(live)),
      h("td", {}, triggerKind(summary.trigger)),
      ...["pending", "processing", "completed", "failed", "skipped"].map((k) => h("td", { class: "num", "data-count": k }, st ? count(c[k] || 0) : "…")),
      h("td", { class: "num", "data-count": "sent" }, st ? count(st.sent) : "…"),
      h(
        "td",
        {},
        total
          ? h("progress", { max: String(total), value: String(done), "aria-label": `Progress of ${summary.name}: ${done} of ${total} executions finished` })
          : h("span", { class: "hint" }, "—"),
        total ? h("span", { class: "hint" }, ` ${Math.floor((100 * done) / total)}%`) : null,
      ),
      h("td", {}, live === "DRAFT" ? h("a", { href: `#/campaigns/${summary.id}/edit`, "aria-label": `Edit ${summary.name}` }, "Edit") : h("a", { href: `#/campaigns/${summary.id}/edit`, "aria-label": `Flow of ${summary.name}` }, "Flow")),
    ];
    const row = h("tr", { "data-campaign": summary.id, "data-state": live }, cells);
    if (entry.row) entry.row.replaceWith(row);
    entry.row = row;
    return row;
  }

  async function refreshStatus(entry) {
    try {
      entry.status = await get(`/v1/campaigns/${entry.summary.id}/status`);
    } catch {
      entry.status = entry.status || null;
    }
    renderRow(entry);
  }

  async function load() {
    try {
      const page = await get("/v1/campaigns", { state: state || undefined, limit: 50, cursor: cursor || undefined });
      for (const summary of page.items) {
        const entry = { summary, row: null, status: null };
        rows.set(summary.id, entry);
        tbody.append(renderRow(entry));
        refreshStatus(entry);
      }
      cursor = page.next_cursor;
      more.hidden = !cursor;
      if (!rows.size) tbody.append(h("tr", {}, h("td", { colspan: "11" }, state ? `No ${state} campaign.` : "No campaign yet: create one above.")));
    } catch (error) {
      status.textContent = `Campaigns could not be loaded: ${errorText(error)}`;
    }
  }
  more.addEventListener("click", load);

  async function poll() {
    if (stopped) return;
    const live = Array.from(rows.values()).filter((e) => LIVE.includes(e.status?.state || e.summary.state));
    await Promise.all(live.map(refreshStatus));
    if (!stopped) timer = window.setTimeout(poll, POLL_MS);
  }

  // ---- create -------------------------------------------------------------------------------
  const name = h("input", { type: "text", required: true, maxlength: "200", placeholder: "Welcome series" });
  const kind = select([["manual", "Manual"], ["schedule", "Scheduled"], ["event", "Event"], ["api", "API"]], "manual");
  const createStatus = h("p", { class: "form-status", role: "alert" });
  const form = h(
    "form",
    {
      class: "create row",
      "aria-labelledby": "create-title",
      onsubmit: async (event) => {
        event.preventDefault();
        if (!name.value.trim()) {
          createStatus.textContent = "Give the campaign a name.";
          name.setAttribute("aria-invalid", "true");
          name.focus();
          return;
        }
        try {
          const made = await post("/v1/campaigns", {
            name: name.value.trim(),
            trigger: { [kind.value]: {} },
            flow: { steps: [{ id: "e1", end: {} }] },
          });
          announce(`Campaign ${made.name} created`);
          navigate(`#/campaigns/${made.id}/edit`);
        } catch (error) {
          createStatus.textContent = `Not created: ${errorText(error)}`;
        }
      },
    },
    field("Name", name),
    field("Trigger", kind),
    h("button", { type: "submit", class: "primary" }, "Create campaign"),
  );

  fill(main, 
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Campaigns")),
    h("section", { class: "panel", "aria-labelledby": "create-title" }, h("h2", { id: "create-title" }, "New campaign"), form, createStatus),
    h(
      "section",
      { class: "panel", "aria-labelledby": "list-title" },
      h("h2", { id: "list-title" }, "All campaigns"),
      h("div", { class: "row" }, field("Filter by state", filter)),
      h("div", { class: "table-wrap" }, table),
      more,
      status,
    ),
  );
  await load();
  timer = window.setTimeout(poll, POLL_MS);
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}
