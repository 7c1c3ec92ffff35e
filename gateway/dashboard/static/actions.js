// Launch / schedule / pause / resume ... as the campaign state machine allows them (PRODUCT.md).
// An action the state does not allow stays visible but disabled (aria-disabled, so it can still
// be focused and read), with the reason as its tooltip and accessible description.

import { ApiError, get, post } from "./api.js";
import { announce, count, errorText, field, h, money, nextId } from "./dom.js";

const PAUSED = ["PAUSED", "PAUSED_ERROR", "PAUSED_BALANCE"];
const FINISHED = ["COMPLETED", "COMPLETED_PARTIAL"];

/** Every action with whether the campaign's state allows it, and why not. */
export function allowedActions(campaign) {
  const state = campaign.state;
  const trigger = campaign.trigger || {};
  const kind = trigger.api ? "api" : trigger.schedule ? "schedule" : trigger.event ? "event" : "manual";
  const is = (...states) => states.includes(state);
  const deny = (reason) => ({ enabled: false, reason });
  const ok = { enabled: true, reason: "" };
  const actions = [];

  let launch;
  if (!is("DRAFT")) launch = deny(`Only a DRAFT campaign can be launched; this one is ${state}.`);
  else if (kind === "api") launch = deny("An API-triggered campaign starts with each trigger call (use Trigger now).");
  else if (kind === "schedule") launch = deny("A campaign with a scheduled trigger is scheduled, not launched by hand.");
  else launch = ok;
  actions.push({ verb: "start", label: kind === "event" ? "Activate" : "Launch", ...launch });

  let schedule;
  if (kind !== "schedule") schedule = deny("Only a campaign with a scheduled trigger can be scheduled.");
  else if (!is("DRAFT")) schedule = deny(`Only a DRAFT campaign can be scheduled; this one is ${state}.`);
  else schedule = ok;
  actions.push({ verb: "schedule", label: "Schedule", ...schedule });

  actions.push({
    verb: "unschedule",
    label: "Unschedule",
    ...(is("SCHEDULED") ? ok : deny(`Only a SCHEDULED campaign can be unscheduled; this one is ${state}.`)),
  });

  if (kind === "api") {
    let trig;
    if (is("DRAFT", ...FINISHED)) trig = ok;
    else if (is("RUNNING", ...PAUSED)) trig = deny("A run is in progress; a new trigger is refused until it finishes.");
    else trig = deny(`A ${state} campaign cannot be triggered.`);
    actions.push({ verb: "trigger", label: "Trigger now", ...trig });
  }

  let pause;
  if (is("RUNNING")) pause = ok;
  else if (is(...PAUSED)) pause = deny(`The campaign is already ${state}.`);
  else pause = deny(`Only a RUNNING campaign can be paused; this one is ${state}.`);
  actions.push({ verb: "pause", label: "Pause", ...pause });

  actions.push({
    verb: "resume",
    label: "Resume",
    ...(is(...PAUSED) ? ok : deny(`Only a paused campaign can be resumed; this one is ${state}.`)),
  });

  actions.push({
    verb: "archive",
    label: "Archive",
    ...(is("DRAFT", ...FINISHED)
      ? ok
      : deny(`Only a DRAFT, COMPLETED or COMPLETED_PARTIAL campaign can be archived; this one is ${state}.`)),
  });
  return actions;
}

/** A button that is disabled with a reason: focusable, aria-disabled, titled, described. */
export function actionButton(label, { enabled, reason, onclick, name, primary }) {
  const button = h("button", { type: "button", class: primary ? "primary" : "", "data-action": name }, label);
  if (enabled) {
    button.addEventListener("click", onclick);
  } else {
    const why = h("span", { class: "visually-hidden", id: nextId("why") }, reason);
    button.setAttribute("aria-disabled", "true");
    button.setAttribute("title", reason);
    button.setAttribute("aria-description", reason);
    button.setAttribute("aria-describedby", why.id);
    button.addEventListener("click", (event) => {
      event.preventDefault();
      announce(reason);
    });
    return h("span", { class: "action" }, button, why);
  }
  return h("span", { class: "action" }, button);
}

/**
 * The action bar of a campaign. `hooks.before(verb)` may save and validate first (returns false
 * to stop); `hooks.after(verb, reply)` refreshes the page; `hooks.problems(error)` shows a 422.
 */
export function actionBar(campaign, hooks = {}) {
  const message = h("div", { class: "action-message", role: "alert" });
  const bar = h("div", { class: "actions", role: "group", "aria-label": "Campaign actions" });
  for (const action of allowedActions(campaign)) {
    const run = async () => {
      message.textContent = "";
      try {
        if (hooks.before && (await hooks.before(action.verb)) === false) return;
        const path = `/v1/campaigns/${campaign.id}/${action.verb}`;
        const body = action.verb === "schedule" && hooks.scheduleBody ? hooks.scheduleBody() : undefined;
        const reply = await post(path, body);
        announce(`${action.label}: done`);
        if (hooks.after) await hooks.after(action.verb, reply);
      } catch (error) {
        message.replaceChildren(problemText(error, campaign));
        if (error instanceof ApiError && error.status === 402) {
          message.append(topUpForm({ after: () => (message.textContent = "Topped up. Try again.") }));
        }
        if (hooks.problems && error instanceof ApiError) hooks.problems(error);
      }
    };
    bar.append(
      actionButton(action.label, {
        ...action,
        name: action.verb,
        primary: ["start", "schedule", "resume", "trigger"].includes(action.verb),
        onclick: run,
      }),
    );
  }
  return h("div", { class: "action-bar" }, bar, message);
}

function problemText(error, campaign) {
  if (!(error instanceof ApiError)) return `Something went wrong: ${error.message}`;
  if (error.status === 402) return `Not enough free balance: ${error.message}. Top up, then try again.`;
  if (error.status === 409) return `Not possible in state ${campaign.state}: ${error.message}`;
  if (error.status === 422) return `The campaign breaks launch rules: ${errorText(error)}`;
  if (error.status === 403) return `This API key may not do that: ${error.message}`;
  return errorText(error);
}

/** What to do about PAUSED_ERROR / PAUSED_BALANCE before resuming; null for other states. */
export function pausedHelp(campaign, reason) {
  if (campaign.state === "PAUSED_BALANCE") {
    return h(
      "section",
      { class: "callout warning", "aria-labelledby": "paused-balance-title" },
      h("h3", { id: "paused-balance-title" }, "Paused: the free balance ran out"),
      h("p", {}, reason ? `Why: ${reason}. ` : "", "Top up the balance first, then resume. ",
        "Auto-reload tops up but never resumes a campaign: resuming is always your call."),
      topUpForm({}),
    );
  }
  if (campaign.state === "PAUSED_ERROR") {
    return h(
      "section",
      { class: "callout warning", "aria-labelledby": "paused-error-title" },
      h("h3", { id: "paused-error-title" }, "Paused: the channel provider is failing"),
      h("p", {}, reason ? `Why: ${reason}. ` : "",
        "The provider's circuit breaker opened. Wait for the provider to recover (check its status), ",
        "then resume: only pending executions are re-queued, nothing is sent twice."),
    );
  }
  if (campaign.state === "PAUSED") {
    return h("p", { class: "callout" }, "Paused by an operator. Resume re-queues only pending executions.");
  }
  return null;
}

function randomKey() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return `dash-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** Top up the prepaid balance (at least EUR 10); shows the free balance. */
export function topUpForm({ after } = {}) {
  const amount = h("input", { type: "number", min: "10", step: "0.01", value: "50", inputmode: "decimal", required: true });
  const balance = h("p", { class: "balance", "aria-live": "polite" });
  const status = h("p", { class: "form-status", role: "status" });
  const showBalance = async () => {
    try {
      const b = await get("/v1/billing/balance");
      balance.textContent = `Free balance: ${money(b.free_cents)} (reserved ${money(b.reserved_cents)})`;
    } catch (error) {
      balance.textContent = error instanceof ApiError && error.status === 403
        ? "This key cannot read the balance (billing:read)."
        : "";
    }
  };
  const key = randomKey();
  const form = h(
    "form",
    {
      class: "top-up",
      "aria-label": "Top up the balance",
      novalidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        const cents = Math.round(Number(amount.value) * 100);
        if (!(cents >= 1000)) {
          status.textContent = "A top-up is at least €10.00.";
          amount.setAttribute("aria-invalid", "true");
          return;
        }
        amount.removeAttribute("aria-invalid");
        try {
          const b = await post("/v1/billing/top-ups", { amount_cents: cents, idempotency_key: `${key}-${cents}` });
          status.textContent = `Topped up ${money(cents)}. Free balance now ${money(b.free_cents)}.`;
          balance.textContent = `Free balance: ${money(b.free_cents)} (reserved ${money(b.reserved_cents)})`;
          announce(status.textContent);
          if (after) after(b);
        } catch (error) {
          status.textContent = error instanceof ApiError && error.status === 403
            ? "This key may not top up (it needs billing:write)."
            : errorText(error);
        }
      },
    },
    balance,
    field("Top-up amount (EUR, at least 10)", amount),
    h("button", { type: "submit" }, "Top up"),
    status,
  );
  showBalance();
  return form;
}

export function countsList(counts, sent) {
  const items = ["pending", "processing", "completed", "failed", "skipped"].map((state) =>
    h("div", { class: `count count-${state}`, "data-count": state },
      h("dt", {}, state), h("dd", {}, count(counts?.[state] ?? 0))),
  );
  if (sent !== undefined) items.push(h("div", { class: "count", "data-count": "sent" }, h("dt", {}, "sent"), h("dd", {}, count(sent))));
  return h("dl", { class: "counts" }, items);
}
