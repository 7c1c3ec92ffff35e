// Campaign detail: counts by execution state, the per-node funnel, the estimated remaining cost,
// the state history, the actions, and executions with a link to their trace in Jaeger.

import { actionBar, countsList, pausedHelp } from "./actions.js";
import { ApiError, dashboardConfig, get, traceUrl } from "./api.js";
import { clear, count, errorText, field, fill, h, money, select, stateBadge, triggerKind, when } from "./dom.js";

const POLL_MS = 2000;
const LIVE = ["RUNNING", "SCHEDULED"];
const EXECUTION_STATES = ["pending", "processing", "completed", "failed", "skipped"];

export async function detailView(main, id, { navigate, query }) {
  const cfg = await dashboardConfig();
  let campaign = await get(`/v1/campaigns/${id}`);
  let status = await get(`/v1/campaigns/${id}/status`);
  let runId = query.get("run") || status.run_id || "";
  let stopped = false;
  let timer = null;

  const statusBox = h("div", { class: "status-box", "aria-live": "off" });
  const funnelBox = h("div", { class: "funnel-box" });
  const historyBox = h("div");
  const executionsBox = h("div");
  const lookupBox = h("div", { "aria-live": "polite" });
  const helpBox = h("div");
  const actionsBox = h("div");
  const stateLine = h("span", { "data-testid": "campaign-state" }, stateBadge(status.state));
  const liveNote = h("p", { class: "visually-hidden", role: "status" });

  async function transitions() {
    const items = [];
    let cursor;
    do {
      const page = await get(`/v1/campaigns/${id}/transitions`, { limit: 500, cursor });
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    return items;
  }

  function renderStatus() {
    fill(statusBox, 
      h(
        "dl",
        { class: "figures" },
        h("div", {}, h("dt", {}, "State"), h("dd", { "data-figure": "state" }, status.state)),
        h("div", {}, h("dt", {}, "Run"), h("dd", { "data-figure": "run" }, status.run_id || "none yet")),
        h("div", {}, h("dt", {}, "Estimated remaining cost"), h("dd", { "data-figure": "remaining" }, money(status.estimated_remaining_cost))),
        h("div", {}, h("dt", {}, "Trigger"), h("dd", {}, triggerKind(campaign.trigger))),
      ),
      h("h3", {}, "Executions by state"),
      countsList(status.counts, status.sent),
    );
    fill(stateLine, stateBadge(status.state));
  }

  async function renderFunnel() {
    let funnel;
    try {
      funnel = await get(`/v1/campaigns/${id}/funnel`, { run_id: runId || undefined });
    } catch (error) {
      fill(funnelBox, h("p", { class: "bad" }, `The funnel could not be loaded: ${errorText(error)}`));
      return;
    }
    const total = funnel.executions || 0;
    const rows = funnel.nodes.map((n) => {
      const atNow = EXECUTION_STATES.filter((s) => n.at[s]).map((s) => `${count(n.at[s])} ${s}`).join(", ") || "—";
      const skipped = n.skipped.length
        ? h("ul", { class: "reasons" }, n.skipped.map((r) => h("li", { "data-reason": r.reason }, `${r.reason}: ${count(r.count)}`)))
        : "—";
      const failed = n.failed.length ? h("ul", { class: "reasons bad" }, n.failed.map((r) => h("li", {}, `failed ${r.reason}: ${count(r.count)}`))) : null;
      let split = "—";
      if (n.condition) {
        split = h("span", {}, h("span", { "data-metric": "yes", "data-value": n.condition.yes }, `yes ${count(n.condition.yes)}`), " / ", h("span", { "data-metric": "no", "data-value": n.condition.no }, `no ${count(n.condition.no)}`));
      } else if (n.variants) {
        split = h("ul", { class: "variants-split" }, n.variants.map((v) => h("li", { "data-variant": v.name, "data-value": v.count }, `${v.name} (${v.weight}%): ${count(v.count)}`)));
      }
      const bar = h("span", { class: "bar", "aria-hidden": "true" });
      bar.style.width = `${total ? Math.round((100 * n.entered) / total) : 0}%`;
      const step = h(
        "th",
        { scope: "row", class: "funnel-step" },
        h("span", { class: "indent" }),
        n.branch ? h("span", { class: "branch-label" }, `${n.parent_id} ${n.branch} ▸ `) : null,
        h("span", { class: `kind kind-${String(n.type || "").toLowerCase()}` }, n.type || "STEP"),
        " ",
        n.node_id,
        n.name ? h("span", { class: "hint" }, ` · ${n.name}`) : null,
      );
      step.style.setProperty("--depth", String(n.depth));
      return h(
        "tr",
        { "data-node": n.node_id },
        step,
        h("td", { class: "num", "data-metric": "entered", "data-value": n.entered }, h("span", { class: "bar-wrap" }, bar), count(n.entered)),
        h("td", { "data-metric": "at" }, atNow),
        h("td", { class: "num", "data-metric": "sent", "data-value": n.sent ?? "" }, n.sent === null ? "—" : count(n.sent)),
        h("td", { "data-metric": "skipped" }, skipped, failed),
        h("td", { "data-metric": "split" }, split),
      );
    });
    fill(funnelBox, 
      h("p", { class: "hint" }, funnel.run_id ? `Run ${funnel.run_id}, flow version ${funnel.flow_version}: ${count(total)} execution${total === 1 ? "" : "s"}. Entered = reached the step (at it now or past it); a contact held by a WAIT counts at the step after it.` : "No run yet: the funnel fills in once the campaign is launched."),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "funnel", "data-testid": "funnel" },
          h("caption", { class: "visually-hidden" }, "Per-step funnel"),
          h("thead", {}, h("tr", {}, ["Step", "Entered", "At this step now", "Sent", "Skipped (reasons)", "Split"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, rows),
        ),
      ),
    );
  }

  async function renderRuns() {
    const runs = (await get(`/v1/campaigns/${id}/runs`, { limit: 100 })).items;
    if (runs.length < 2) return null;
    const picker = select(runs.map((r) => [r.id, `${when(r.started_at)} — ${r.state || "?"} (${r.id.slice(0, 8)}…)`]), runId);
    picker.addEventListener("change", () => navigate(`#/campaigns/${id}?run=${picker.value}`));
    return field("Run", picker);
  }

  async function renderHistory() {
    const items = await transitions();
    fill(historyBox, 
      items.length
        ? h(
            "table",
            { class: "history", "data-testid": "history" },
            h("caption", { class: "visually-hidden" }, "State history, oldest first"),
            h("thead", {}, h("tr", {}, ["When", "From", "To", "By", "Why"].map((c) => h("th", { scope: "col" }, c)))),
            h(
              "tbody",
              {},
              items.map((t) => h("tr", {}, h("td", {}, when(t.at)), h("td", {}, t.from_state), h("td", {}, t.to_state), h("td", {}, t.actor), h("td", {}, t.reason || "—"))),
            ),
          )
        : h("p", { class: "hint" }, "No state change yet."),
    );
    return items;
  }

  function traceLink(traceId) {
    if (!traceId) return h("span", { class: "hint" }, "no trace");
    return h(
      "a",
      { href: traceUrl(cfg, traceId), target: "_blank", rel: "noopener noreferrer", class: "trace-link", "data-trace": traceId },
      "Trace in Jaeger",
      h("span", { class: "visually-hidden" }, ` ${traceId} (opens in a new tab)`),
    );
  }

  // ---- executions ---------------------------------------------------------------------------
  const stateFilter = select([["", "any state"], ...EXECUTION_STATES.map((s) => [s, s])], "");
  const nodeFilter = h("input", { type: "text", pattern: "[A-Za-z0-9_-]{1,64}", placeholder: "e.g. s1" });
  let executionsCursor = null;
  async function renderExecutions(append = false) {
    const list = append ? executionsBox.querySelector("tbody") : null;
    let page;
    try {
      page = await get(`/v1/campaigns/${id}/executions`, {
        run_id: runId || undefined,
        state: stateFilter.value || undefined,
        node_id: nodeFilter.value.trim() || undefined,
        limit: 20,
        cursor: append ? executionsCursor : undefined,
      });
    } catch (error) {
      fill(executionsBox, h("p", { class: "bad" }, errorText(error)));
      return;
    }
    executionsCursor = page.next_cursor;
    const rows = page.items.map((e) =>
      h(
        "tr",
        { "data-execution": e.id },
        h("td", {}, h("button", { type: "button", class: "link", onclick: () => lookup(e.id) }, h("code", {}, e.id))),
        h("td", {}, e.contact_id),
        h("td", {}, e.state),
        h("td", {}, e.node_id || "—"),
        h("td", {}, e.reason || "—"),
        h("td", {}, e.ab_variant || "—"),
        h("td", {}, traceLink(e.trace_id)),
      ),
    );
    if (list) {
      list.append(...rows);
    } else {
      fill(executionsBox, 
        rows.length
          ? h(
              "div",
              { class: "table-wrap" },
              h(
                "table",
                { class: "executions" },
                h("caption", { class: "visually-hidden" }, "Executions"),
                h("thead", {}, h("tr", {}, ["Execution", "Contact", "State", "Node", "Reason", "A/B", "Trace"].map((c) => h("th", { scope: "col" }, c)))),
                h("tbody", {}, rows),
              ),
            )
          : h("p", { class: "hint" }, "No execution matches."),
      );
    }
    const moreButton = executionsBox.querySelector("button.more");
    if (moreButton) moreButton.remove();
    if (executionsCursor) executionsBox.append(h("button", { type: "button", class: "more", onclick: () => renderExecutions(true) }, "More executions"));
  }

  const lookupInput = h("input", { type: "text", placeholder: "ex_…", pattern: "ex_[0-9a-f]{32}", spellcheck: "false" });
  async function lookup(executionId) {
    lookupInput.value = executionId;
    fill(lookupBox, "Looking up…");
    try {
      const e = await get(`/v1/executions/${executionId}`);
      fill(lookupBox, 
        h(
          "section",
          { class: "execution-detail", "aria-label": `Execution ${e.id}` },
          h("h3", {}, "Execution ", h("code", {}, e.id)),
          h(
            "dl",
            { class: "figures" },
            ...[
              ["Contact", e.contact_id],
              ["State", e.state],
              ["Node", e.node_id || "—"],
              ["Reason", e.reason || "—"],
              ["A/B variant", e.ab_variant || "—"],
              ["Wakes at", when(e.wake_at)],
              ["Run", e.run_id],
              ["Trace id", e.trace_id || "—"],
            ].map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
          ),
          h("p", {}, traceLink(e.trace_id)),
          e.sends.length
            ? h(
                "table",
                { class: "sends" },
                h("caption", {}, "Messages sent"),
                h("thead", {}, h("tr", {}, ["Node", "Channel", "Provider", "Status", "Cost", "At"].map((c) => h("th", { scope: "col" }, c)))),
                h("tbody", {}, e.sends.map((s) => h("tr", {}, h("td", {}, s.node_id), h("td", {}, s.channel || "—"), h("td", {}, s.provider), h("td", {}, s.status || "—"), h("td", {}, money(s.cost_cents)), h("td", {}, when(s.created_at))))),
              )
            : h("p", { class: "hint" }, "No message sent yet."),
        ),
      );
    } catch (error) {
      fill(lookupBox, h("p", { class: "bad", role: "alert" }, error instanceof ApiError && error.status === 404 ? `No execution ${executionId} in this workspace.` : errorText(error)));
    }
  }

  // ---- actions and help -------------------------------------------------------------------------
  async function renderTop(history) {
    campaign = await get(`/v1/campaigns/${id}`);
    const last = [...history].reverse().find((t) => t.to_state === status.state);
    clear(helpBox);
    const help = pausedHelp({ ...campaign, state: status.state }, last?.reason);
    if (help) helpBox.append(help);
    fill(actionsBox, 
      actionBar({ ...campaign, state: status.state }, {
        async after(verb) {
          if (verb === "archive") {
            navigate("#/campaigns");
            return;
          }
          await refresh(true);
        },
      }),
    );
  }

  async function refresh(full) {
    const before = status.state;
    status = await get(`/v1/campaigns/${id}/status`);
    if (!query.get("run")) runId = status.run_id || "";
    renderStatus();
    await renderFunnel();
    if (full || status.state !== before) {
      const history = await renderHistory();
      await renderTop(history);
      liveNote.textContent = `The campaign is now ${status.state}`;
    }
  }

  async function poll() {
    if (stopped) return;
    try {
      if (LIVE.includes(status.state)) await refresh(false);
    } catch {
      // A failed poll is retried at the next tick.
    }
    if (!stopped) timer = window.setTimeout(poll, POLL_MS);
  }

  const runPicker = await renderRuns();
  fill(main, 
    h(
      "div",
      { class: "page-head" },
      h("h1", { tabindex: "-1" }, campaign.name, " ", stateLine),
      h("p", {}, h("a", { href: `#/campaigns/${id}/edit` }, campaign.state === "DRAFT" ? "Edit the flow and settings →" : "View the flow →")),
      liveNote,
    ),
    helpBox,
    actionsBox,
    h("section", { class: "panel", "aria-labelledby": "status-title" }, h("h2", { id: "status-title" }, "Status"), statusBox),
    h("section", { class: "panel", "aria-labelledby": "funnel-title" }, h("h2", { id: "funnel-title" }, "Funnel"), runPicker, funnelBox),
    h("section", { class: "panel", "aria-labelledby": "history-title" }, h("h2", { id: "history-title" }, "State history"), historyBox),
    h(
      "section",
      { class: "panel", "aria-labelledby": "executions-title" },
      h("h2", { id: "executions-title" }, "Executions"),
      h(
        "form",
        {
          class: "row",
          "aria-label": "Look up an execution",
          onsubmit: (event) => {
            event.preventDefault();
            const value = lookupInput.value.trim();
            if (!/^ex_[0-9a-f]{32}$/.test(value)) {
              fill(lookupBox, h("p", { class: "bad", role: "alert" }, "An execution id is ex_ followed by 32 hex digits."));
              lookupInput.setAttribute("aria-invalid", "true");
              return;
            }
            lookupInput.removeAttribute("aria-invalid");
            lookup(value);
          },
        },
        field("Execution id", lookupInput),
        h("button", { type: "submit" }, "Look up"),
      ),
      lookupBox,
      h(
        "form",
        {
          class: "row",
          "aria-label": "Filter executions",
          onsubmit: (event) => {
            event.preventDefault();
            renderExecutions();
          },
        },
        field("State", stateFilter),
        field("At node", nodeFilter),
        h("button", { type: "submit" }, "List executions"),
      ),
      executionsBox,
    ),
  );
  renderStatus();
  await Promise.all([renderFunnel(), renderHistory().then(renderTop), renderExecutions()]);
  timer = window.setTimeout(poll, POLL_MS);
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}
