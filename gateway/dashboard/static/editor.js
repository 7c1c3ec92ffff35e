// The campaign editor page: name, segment (with live audience size), trigger settings, the flow
// builder, validation on the nodes, the cost estimate, and the launch buttons.

import { actionBar, pausedHelp, topUpForm } from "./actions.js";
import { ApiError, get, keyHint, patch, post } from "./api.js";
import { createBuilder } from "./builder.js";
import { announce, clear, count, errorText, field, fill, h, money, nextId, select, stateBadge, triggerKind } from "./dom.js";

const EXAMPLE_EVENT = "contact.created";

function timeZones() {
  try {
    return Intl.supportedValuesOf("timeZone");
  } catch {
    return ["UTC", "Europe/Paris", "Europe/London", "America/New_York"];
  }
}

function browserZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

async function allSegments() {
  const items = [];
  let cursor;
  do {
    const page = await get("/v1/segments", { limit: 100, cursor });
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < 1000);
  return items;
}

export async function editorView(main, id, { navigate }) {
  let campaign = await get(`/v1/campaigns/${id}`);
  const draft = campaign.state === "DRAFT";
  let dirty = false;
  const saveState = h("span", { class: "save-state", role: "status" }, "All changes saved");
  const markDirty = () => {
    if (!dirty) {
      dirty = true;
      saveState.textContent = "Unsaved changes";
      saveState.classList.add("dirty");
    }
  };
  const markClean = () => {
    dirty = false;
    saveState.textContent = "All changes saved";
    saveState.classList.remove("dirty");
  };

  // ---- settings ---------------------------------------------------------------------------------
  const name = h("input", { type: "text", value: campaign.name, maxlength: "200", required: true, disabled: !draft });
  name.addEventListener("input", markDirty);

  const audience = h("p", { class: "audience", "aria-live": "polite", "data-testid": "audience" });
  const segmentSelect = h("select", { disabled: !draft }, h("option", { value: campaign.segment_id || "" }, campaign.segment_id || "Loading segments…"));
  const segmentNote = h("span", { class: "hint" });
  const showAudience = async () => {
    const segmentId = segmentSelect.value;
    if (!segmentId) {
      audience.textContent = "No segment: choose the audience (API and event campaigns may go without).";
      return;
    }
    audience.textContent = "Counting the audience…";
    try {
      const size = (await get(`/v1/segments/${segmentId}/estimate`)).size;
      audience.textContent = `Audience: ${count(size)} contact${size === 1 ? "" : "s"}`;
      audience.dataset.size = String(size);
    } catch (error) {
      audience.textContent = `The audience could not be counted: ${errorText(error)}`;
    }
  };
  allSegments().then(
    (segments) => {
      clear(segmentSelect);
      segmentSelect.append(h("option", { value: "" }, "— no segment —"));
      for (const s of segments) segmentSelect.append(h("option", { value: s.id }, `${s.name} (${s.id})`));
      segmentSelect.value = campaign.segment_id || "";
      segmentNote.textContent = `${segments.length} segment${segments.length === 1 ? "" : "s"}`;
      showAudience();
    },
    (error) => {
      segmentNote.textContent = error instanceof ApiError && error.status === 403
        ? "This key cannot list segments (contacts:read)."
        : `Segments could not be loaded: ${errorText(error)}`;
    },
  );
  segmentSelect.addEventListener("change", async () => {
    showAudience();
    // The segment is saved at once, so the projected cost follows the pick.
    try {
      campaign = await patch(`/v1/campaigns/${id}`, { segment_id: segmentSelect.value || null });
      announce("Segment saved");
      refreshEstimate();
    } catch (error) {
      message.textContent = `The segment could not be saved: ${errorText(error)}`;
    }
  });

  const trigger = triggerEditor(campaign, draft, markDirty);

  // ---- flow -------------------------------------------------------------------------------------
  const builder = createBuilder({ flow: campaign.flow, readOnly: !draft, onChange: markDirty });

  // ---- check and launch ---------------------------------------------------------------------------
  const message = h("div", { class: "form-status", role: "alert" });
  const problems = h("div", { class: "problems", "aria-live": "polite" });
  const estimate = h("div", { class: "estimate", "aria-live": "polite", "data-testid": "estimate" });
  const actions = h("div");

  function body() {
    return {
      name: name.value.trim(),
      segment_id: segmentSelect.value || null,
      trigger: trigger.value(),
      flow: builder.flow(),
    };
  }

  async function save() {
    message.textContent = "";
    try {
      campaign = await patch(`/v1/campaigns/${id}`, body());
      markClean();
      announce("Campaign saved");
      await validate();
      await refreshEstimate();
      return true;
    } catch (error) {
      message.textContent = `Not saved: ${errorText(error)}`;
      return false;
    }
  }

  async function validate() {
    const result = await post(`/v1/campaigns/${id}/validate`);
    builder.setErrors(result.errors);
    clear(problems);
    if (result.valid) {
      problems.append(h("p", { class: "ok", "data-testid": "valid" }, "✓ Ready to launch: the flow and its templates pass every launch rule."));
    } else {
      const general = result.errors.filter((e) => !e.node_id);
      const onNodes = result.errors.length - general.length;
      fill(
        problems,
        h("p", { class: "bad" }, `${result.errors.length} problem${result.errors.length === 1 ? "" : "s"} to fix`, onNodes ? ` (${onNodes} shown on their steps)` : "", "."),
        general.length
          ? h("ul", { class: "campaign-errors" }, general.map((e) => h("li", { "data-rule": e.rule }, h("strong", {}, e.field), `: ${e.message}`)))
          : null,
      );
    }
    return result.valid;
  }

  async function refreshEstimate() {
    clear(estimate);
    try {
      const e = await get(`/v1/campaigns/${id}/estimate`);
      estimate.append(
        h(
          "dl",
          { class: "figures" },
          h("div", {}, h("dt", {}, "Audience"), h("dd", { "data-figure": "audience" }, count(e.audience_size))),
          h("div", {}, h("dt", {}, "Expected cost"), h("dd", { "data-figure": "expected" }, money(e.expected_cost_cents))),
          h("div", {}, h("dt", {}, "Upper bound"), h("dd", { "data-figure": "upper" }, money(e.upper_bound_cost_cents))),
          h("div", {}, h("dt", {}, "Free balance"), h("dd", { "data-figure": "balance" }, money(e.free_balance_cents))),
        ),
        h("p", { class: "hint" }, "Expected: A/B branches by weight, CONDITION branches split evenly (launch checks this against the free balance). Upper bound: every contact takes the most expensive branch. As saved."),
      );
      if (!e.balance_sufficient) {
        estimate.append(h("p", { class: "bad" }, "The free balance does not cover the expected cost: a launch now would be refused. Top up first."), topUpForm({ after: refreshEstimate }));
      }
    } catch (error) {
      estimate.append(h("p", { class: "hint" }, `No estimate yet: ${errorText(error)}`));
    }
  }

  function renderActions() {
    clear(actions);
    actions.append(
      actionBar(campaign, {
        async before(verb) {
          if (!["start", "schedule", "trigger"].includes(verb) || !draft) return true;
          if (verb === "schedule" && !trigger.value().schedule?.at) {
            message.textContent = "Set the date, time and time zone of the schedule first.";
            return false;
          }
          if (dirty && !(await save())) return false;
          if (!(await validate())) {
            announce("The campaign has problems to fix before launch");
            message.textContent = "Fix the problems shown on the steps first.";
            return false;
          }
          return true;
        },
        async after(verb) {
          if (verb === "start" || verb === "trigger") navigate(`#/campaigns/${id}`);
          else navigate(`#/campaigns/${id}/edit`, { reload: true });
        },
        problems(error) {
          if (error.status === 422) validate();
        },
      }),
    );
  }

  const saveButton = h("button", { type: "button", class: "primary", disabled: !draft, onclick: save }, "Save");
  const validateButton = h("button", { type: "button", onclick: async () => { if (dirty) await save(); else await validate(); } }, "Validate");

  fill(main, 
    h(
      "div",
      { class: "page-head" },
      h("h1", { tabindex: "-1" }, draft ? "Edit campaign" : "Campaign flow", " ", h("span", { class: "sub" }, campaign.name), " ", stateBadge(campaign.state)),
      h("p", {}, h("a", { href: `#/campaigns/${id}` }, "Status, funnel and history →")),
    ),
    draft ? null : h("p", { class: "callout" }, `This campaign is ${campaign.state}: only a DRAFT can be edited${campaign.state === "SCHEDULED" ? " (unschedule it first)" : ""}.`),
    pausedHelp(campaign),
    h(
      "section",
      { class: "panel settings", "aria-labelledby": "settings-title" },
      h("h2", { id: "settings-title" }, "Settings"),
      field("Campaign name", name),
      h("div", { class: "field" }, h("label", { for: (segmentSelect.id = nextId("seg")) }, "Segment (audience)"), segmentSelect, segmentNote),
      audience,
      trigger.element,
    ),
    h("section", { class: "panel flow", "aria-labelledby": "flow-title" }, h("h2", { id: "flow-title" }, "Flow"), builder.element),
    h(
      "section",
      { class: "panel launch", "aria-labelledby": "launch-title" },
      h("h2", { id: "launch-title" }, "Check and launch"),
      h("div", { class: "row" }, saveButton, validateButton, saveState),
      message,
      problems,
      h("h3", {}, "Projected cost"),
      estimate,
      actions,
    ),
  );
  renderActions();
  if (draft) validate().catch(() => {});
  refreshEstimate();
  return () => {};
}

function triggerEditor(campaign, editable, markDirty) {
  const t = campaign.trigger || { manual: {} };
  let kind = triggerKind(t);
  const group = nextId("trigger");
  const box = h("fieldset", { class: "trigger" }, h("legend", {}, "Trigger"));
  const details = h("div", { class: "trigger-details" });
  const choices = [["manual", "Manual (an operator launches it)"], ["scheduled", "Scheduled (date, time and time zone)"], ["event", "Event (each matching contact enters)"], ["API", "API (your backend triggers runs)"]];
  const radios = h("div", { class: "radios" });
  for (const [value, label] of choices) {
    const input = h("input", { type: "radio", name: group, value, checked: kind === value, disabled: !editable, id: nextId("r") });
    input.addEventListener("change", () => {
      kind = value;
      markDirty();
      renderDetails();
    });
    radios.append(h("div", { class: "radio" }, input, h("label", { for: input.id }, label)));
  }
  box.append(radios, details);

  const schedule = t.schedule || {};
  const at = h("input", { type: "datetime-local", value: schedule.at ? schedule.at.slice(0, 16) : "", disabled: !editable });
  const zone = select(timeZones(), schedule.time_zone || browserZone(), { disabled: !editable });
  const event = t.event || {};
  const eventType = h("input", { type: "text", value: event.event_type || EXAMPLE_EVENT, disabled: !editable, placeholder: EXAMPLE_EVENT });
  const requiredTag = h("input", { type: "text", value: event.required_tag || "", disabled: !editable, placeholder: "onboarding" });
  const reentry = h("input", { type: "checkbox", checked: Boolean(event.allow_reentry), disabled: !editable });
  for (const el of [at, zone, eventType, requiredTag, reentry]) el.addEventListener("input", markDirty);
  zone.addEventListener("change", markDirty);

  function renderDetails() {
    clear(details);
    if (kind === "scheduled") {
      details.append(
        h("div", { class: "row" }, field("Date and time (wall clock in the time zone)", at), field("Time zone (IANA)", zone)),
        h("p", { class: "hint" }, "Daylight saving is handled by the service: a time in a spring-forward gap runs shifted by the gap, a repeated time at its first occurrence."),
      );
    } else if (kind === "event") {
      const reentryId = (reentry.id = reentry.id || nextId("re"));
      details.append(
        h("div", { class: "row" }, field("Event type", eventType, "A contact event, e.g. contact.created"), field("Only contacts with tag (optional)", requiredTag)),
        h("div", { class: "checkbox" }, reentry, h("label", { for: reentryId }, "A contact may enter again after its execution ended")),
        h("p", { class: "hint" }, "Activated once, the campaign stays RUNNING and accepts entries; contacts matching while it is paused wait as pending."),
      );
    } else if (kind === "API") {
      const endpoint = `${window.location.origin}/v1/campaigns/${campaign.id}/trigger`;
      details.append(
        h("p", {}, "Endpoint: ", h("code", { "data-testid": "trigger-endpoint" }, `POST ${endpoint}`)),
        h("p", { class: "hint" }, `Call it with an API key holding the campaigns:trigger scope (you are signed in with ${keyHint()}; never put a key in a URL). Body: {idempotency_key?, recipients?, data?}; one run per accepted trigger, 409 while a run is in progress.`),
        h("pre", { class: "code" }, `curl -X POST ${endpoint} \\\n  -H "Authorization: Bearer $SHOAL_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '{"idempotency_key": "order-4711"}'`),
      );
    } else {
      details.append(h("p", { class: "hint" }, "Launch it from this page (or POST /v1/campaigns/{id}/start)."));
    }
  }
  renderDetails();

  return {
    element: box,
    value() {
      if (kind === "scheduled") {
        return at.value ? { schedule: { at: at.value.length === 16 ? at.value : at.value.slice(0, 19), time_zone: zone.value } } : { schedule: {} };
      }
      if (kind === "event") {
        const e = { allow_reentry: reentry.checked };
        if (eventType.value.trim()) e.event_type = eventType.value.trim();
        if (requiredTag.value.trim()) e.required_tag = requiredTag.value.trim();
        return { event: e };
      }
      if (kind === "API") return { api: {} };
      return { manual: {} };
    },
  };
}
