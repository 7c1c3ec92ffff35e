// The flow builder: the flow as a vertical timeline of steps, splits as side-by-side branch
// columns. Layout is automatic (CSS grid and flex): nobody positions or connects nodes. Every
// edit is a button or a form control, so the whole builder works from the keyboard.
//
// The model is the flow JSON of the REST API (gateway/flows.py): {steps: [{id, name?, <kind>: {...}}]},
// a CONDITION's branches in `yes` / `no`, an AB_TEST's in `variants[].steps`.

import { ApiError, get, post } from "./api.js";
import { announce, clear, errorText, field, h, nextId, select } from "./dom.js";

export const KINDS = ["send", "wait", "condition", "ab_test", "tag", "end"];
const LABEL = { send: "SEND", wait: "WAIT", condition: "CONDITION", ab_test: "AB_TEST", tag: "TAG", end: "END" };
const PREFIX = { send: "s", wait: "w", condition: "c", ab_test: "ab", tag: "t", end: "e" };
const DESCRIBE = {
  send: "send one message through a channel with a template",
  wait: "hold the contact for a fixed time",
  condition: "split in two branches: yes / no",
  ab_test: "split in 2 to 4 weighted variants",
  tag: "add or remove a tag on the contact",
  end: "complete the execution",
};
const CHANNELS = ["EMAIL", "SMS", "RCS"];
const MESSAGE_TYPES = ["MESSAGE", "CONVERSATION", "NEWSLETTER"];
const OPERATORS = ["eq", "neq", "in", "gt", "gte", "lt", "lte", "contains", "exists"];
const BUILTIN_FIELDS = ["first_name", "last_name", "email", "phone", "external_id", "status", "id", "created_at", "updated_at"];
const UNITS = [["minutes", "minutes"], ["hours", "hours"], ["days", "days"], ["seconds", "seconds"]];
const UNIT_SECONDS = { seconds: 1, minutes: 60, hours: 3600, days: 86400 };

export function kindOf(step) {
  return KINDS.find((k) => step && step[k] !== undefined && step[k] !== null) || "";
}

const isTerminal = (step) => ["end", "condition", "ab_test"].includes(kindOf(step));

/** Every step of the flow, depth first. */
export function* walk(steps) {
  for (const step of steps || []) {
    yield step;
    const kind = kindOf(step);
    if (kind === "condition") {
      yield* walk(step.condition.yes);
      yield* walk(step.condition.no);
    } else if (kind === "ab_test") {
      for (const v of step.ab_test.variants || []) yield* walk(v.steps);
    }
  }
}

export function parseDuration(text) {
  const m = /^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$/.exec(text || "");
  if (!m) return 0;
  const [d, hh, mm, ss] = m.slice(1).map((x) => Number(x || 0));
  return d * 86400 + hh * 3600 + mm * 60 + ss;
}

function durationParts(text) {
  const seconds = parseDuration(text);
  if (!seconds) return { amount: 1, unit: "hours" };
  for (const unit of ["days", "hours", "minutes"]) {
    if (seconds % UNIT_SECONDS[unit] === 0) return { amount: seconds / UNIT_SECONDS[unit], unit };
  }
  return { amount: seconds, unit: "seconds" };
}

function formatDuration(amount, unit) {
  const n = Math.max(0, Math.floor(Number(amount) || 0));
  return { seconds: `PT${n}S`, minutes: `PT${n}M`, hours: `PT${n}H`, days: `P${n}D` }[unit];
}

/**
 * createBuilder({flow, readOnly, onChange}) -> {element, setErrors(errors), flow(), undo()}
 * `onChange()` is called after every edit (the page marks itself unsaved).
 */
export function createBuilder({ flow, readOnly = false, onChange = () => {} }) {
  const model = { steps: structuredClone(flow?.steps || []) };
  const history = [];
  const templateCache = new Map(); // "EMAIL/MESSAGE" -> Promise<[templates]>
  let errors = new Map(); // node id -> [{field, rule, message}]
  let openGap = null; // the "+" whose menu is open
  const root = h("div", { class: "builder" });
  const undoButton = h("button", { type: "button", class: "small", onclick: () => undo() }, "Undo");
  const summary = h("p", { class: "builder-summary", "aria-live": "polite" });

  function usedIds() {
    return new Set(Array.from(walk(model.steps), (s) => s.id));
  }

  function newId(kind) {
    const used = usedIds();
    let n = 1;
    while (used.has(`${PREFIX[kind]}${n}`)) n += 1;
    return `${PREFIX[kind]}${n}`;
  }

  function newStep(kind) {
    const id = newId(kind);
    switch (kind) {
      case "send":
        return { id, send: { channel: "EMAIL", message_type: "MESSAGE" } };
      case "wait":
        return { id, wait: { duration: "PT1H" } };
      case "condition":
        return { id, condition: { predicate: { tag: "" }, yes: [], no: [] } };
      case "ab_test":
        return { id, ab_test: { variants: [{ name: "A", weight: 50, steps: [] }, { name: "B", weight: 50, steps: [] }] } };
      case "tag":
        return { id, tag: { tag: "", action: "ADD" } };
      default:
        return { id, end: {} };
    }
  }

  function snapshot() {
    history.push(JSON.stringify(model.steps));
    if (history.length > 50) history.shift();
  }

  function changed({ structural = false, focusKey = null } = {}) {
    onChange();
    if (structural) render(focusKey);
    else updateSummary();
  }

  function undo() {
    if (!history.length) return;
    model.steps = JSON.parse(history.pop());
    announce("Undone");
    changed({ structural: true, focusKey: "undo" });
  }

  // ---- structural edits ------------------------------------------------------------------------

  function insert(steps, index, kind) {
    snapshot();
    const step = newStep(kind);
    const endStep = () => ({ id: newId("end"), end: {} });
    if (kind === "condition" || kind === "ab_test") {
      // A split ends its sequence: what followed moves into its first branch.
      const rest = steps.splice(index);
      steps.splice(index, 0, step);
      const branches = kind === "condition" ? [step.condition.yes, step.condition.no] : step.ab_test.variants.map((v) => v.steps);
      branches[0].push(...(rest.length ? rest : [endStep()]));
      for (const branch of branches.slice(1)) branch.push(endStep());
    } else {
      steps.splice(index, 0, step);
    }
    openGap = null;
    announce(`${LABEL[kind]} step ${step.id} inserted`);
    changed({ structural: true, focusKey: `${step.id}:title` });
  }

  function remove(steps, index) {
    snapshot();
    const [gone] = steps.splice(index, 1);
    errors.delete(gone.id);
    announce(`Step ${gone.id} deleted`);
    const neighbour = steps[index] || steps[index - 1];
    changed({ structural: true, focusKey: neighbour ? `${neighbour.id}:title` : "undo" });
  }

  function move(steps, index, delta) {
    snapshot();
    const [step] = steps.splice(index, 1);
    steps.splice(index + delta, 0, step);
    announce(`Step ${step.id} moved ${delta < 0 ? "up" : "down"}`);
    changed({ structural: true, focusKey: `${step.id}:${delta < 0 ? "up" : "down"}` });
  }

  // ---- rendering ------------------------------------------------------------------------------

  function render(focusKey = null) {
    const active = focusKey || document.activeElement?.dataset?.key || null;
    clear(root);
    const toolbar = h("div", { class: "builder-toolbar" }, readOnly ? null : undoButton, summary);
    root.append(toolbar, renderSequence(model.steps, "main sequence"));
    undoButton.disabled = history.length === 0;
    updateSummary();
    if (active) {
      const target = root.querySelector(`[data-key="${CSS.escape(active)}"]`);
      if (target) target.focus();
    }
  }

  function updateSummary() {
    const steps = Array.from(walk(model.steps));
    const count = steps.length;
    const problems = Array.from(errors.values()).reduce((n, list) => n + list.length, 0);
    summary.textContent = `${count} step${count === 1 ? "" : "s"}` + (problems ? `, ${problems} problem${problems === 1 ? "" : "s"} to fix` : "");
  }

  function renderSequence(steps, label) {
    const list = h("ol", { class: "sequence", "aria-label": label });
    steps.forEach((step, index) => {
      if (!readOnly) list.append(gap(steps, index, label));
      list.append(h("li", { class: "step" }, renderStep(steps, index)));
    });
    const last = steps[steps.length - 1];
    if (!readOnly && (!last || !isTerminal(last))) list.append(gap(steps, steps.length, label));
    if (!steps.length && readOnly) list.append(h("li", { class: "empty" }, "(no steps)"));
    return list;
  }

  function gap(steps, index, label) {
    const key = `gap:${label}:${index}`;
    const open = openGap === key;
    const position = `${index + 1} of ${label}`;
    const plus = h(
      "button",
      {
        type: "button",
        class: "insert",
        "data-key": key,
        "aria-label": `Insert a step at position ${position}`,
        "aria-haspopup": "menu",
        "aria-expanded": open ? "true" : "false",
        onclick: () => {
          openGap = open ? null : key;
          render(openGap ? `${key}:menu:0` : key);
        },
      },
      "+",
    );
    const item = h("li", { class: `gap${open ? " open" : ""}` }, plus);
    if (open) {
      const menu = h("div", { class: "insert-menu", role: "menu", "aria-label": `Step to insert at position ${position}` });
      const atEnd = index === steps.length;
      const items = KINDS.map((kind, i) => {
        const blocked = kind === "end" && !atEnd;
        const button = h(
          "button",
          {
            type: "button",
            role: "menuitem",
            "data-key": `${key}:menu:${i}`,
            "aria-disabled": blocked ? "true" : null,
            title: blocked ? "END must be the last step of its sequence" : DESCRIBE[kind],
            onclick: () => {
              if (!blocked) insert(steps, index, kind);
            },
          },
          h("span", { class: `kind kind-${kind}` }, LABEL[kind]),
          h("span", { class: "menu-hint" }, blocked ? " (only at the end)" : ` — ${DESCRIBE[kind]}`),
        );
        return button;
      });
      menu.addEventListener("keydown", (event) => {
        const at = items.indexOf(document.activeElement);
        if (event.key === "ArrowDown" || event.key === "ArrowUp") {
          event.preventDefault();
          const next = (at + (event.key === "ArrowDown" ? 1 : items.length - 1)) % items.length;
          items[next].focus();
        } else if (event.key === "Escape") {
          event.preventDefault();
          openGap = null;
          render(key);
        } else if (event.key === "Home" || event.key === "End") {
          event.preventDefault();
          items[event.key === "Home" ? 0 : items.length - 1].focus();
        }
      });
      menu.append(...items);
      item.append(menu);
    }
    return item;
  }

  function renderStep(steps, index) {
    const step = steps[index];
    const kind = kindOf(step);
    const nodeErrors = errors.get(step.id) || [];
    const titleId = nextId("node");
    const errorsId = nextId("errs");
    const card = h("article", {
      class: `node node-${kind || "unknown"}${nodeErrors.length ? " has-errors" : ""}`,
      id: `node-${step.id}`,
      "data-node": step.id,
      "aria-labelledby": titleId,
      "aria-describedby": nodeErrors.length ? errorsId : null,
    });
    const title = h(
      "h3",
      { id: titleId, class: "node-title", tabindex: "-1", "data-key": `${step.id}:title` },
      h("span", { class: `kind kind-${kind}` }, LABEL[kind] || "STEP"),
      " ",
      h("span", { class: "node-id" }, step.id),
      step.name ? h("span", { class: "node-name" }, ` · ${step.name}`) : null,
    );
    const head = h("header", { class: "node-head" }, title);
    if (!readOnly) {
      const terminal = isTerminal(step);
      const canUp = !terminal && index > 0;
      const canDown = !terminal && index + 1 < steps.length && !isTerminal(steps[index + 1]);
      const why = terminal
        ? `${LABEL[kind]} stays the last step of its sequence`
        : "";
      head.append(
        h(
          "div",
          { class: "node-tools", role: "group", "aria-label": `Step ${step.id} tools` },
          toolButton("↑", `Move step ${step.id} up`, `${step.id}:up`, canUp, why || "Already the first step", () => move(steps, index, -1)),
          toolButton("↓", `Move step ${step.id} down`, `${step.id}:down`, canDown, why || "Nothing to move below (a split or END stays last)", () => move(steps, index, 1)),
          toolButton("✕", `Delete step ${step.id}${kind === "condition" || kind === "ab_test" ? " and its branches" : ""}`, `${step.id}:delete`, true, "", () => remove(steps, index)),
        ),
      );
    }
    card.append(head);
    const body = h("div", { class: "node-body" });
    body.append(nameField(step));
    const editor = { send: sendEditor, wait: waitEditor, condition: conditionEditor, ab_test: abEditor, tag: tagEditor, end: endEditor }[kind];
    if (editor) body.append(editor(step));
    card.append(body);
    if (nodeErrors.length) {
      card.append(
        h(
          "ul",
          { class: "node-errors", id: errorsId, "aria-label": `Problems of step ${step.id}` },
          nodeErrors.map((e) => h("li", { "data-rule": e.rule }, h("strong", {}, e.rule), `: ${e.message}`)),
        ),
      );
    }
    if (kind === "condition") {
      card.append(
        h(
          "div",
          { class: "branches", role: "group", "aria-label": `Branches of ${step.id}` },
          branch("Yes", `yes branch of ${step.id}`, step.condition.yes),
          branch("No", `no branch of ${step.id}`, step.condition.no),
        ),
      );
    } else if (kind === "ab_test") {
      card.append(
        h(
          "div",
          { class: "branches", role: "group", "aria-label": `Variants of ${step.id}` },
          step.ab_test.variants.map((v, i) =>
            branch(`Variant ${v.name || i + 1} · ${v.weight ?? 0}%`, `variant ${v.name || i + 1} of ${step.id}`, v.steps),
          ),
        ),
      );
    }
    return card;
  }

  function branch(title, label, steps) {
    return h("section", { class: "branch", "aria-label": label }, h("h4", { class: "branch-title" }, title), renderSequence(steps, label));
  }

  function toolButton(text, label, key, enabled, reason, onclick) {
    const attrs = { type: "button", class: "tool", "data-key": key, "aria-label": label, title: enabled ? label : reason };
    if (!enabled) {
      attrs["aria-disabled"] = "true";
      attrs["aria-description"] = reason;
    } else {
      attrs.onclick = onclick;
    }
    return h("button", attrs, text);
  }

  // ---- per-kind editors ------------------------------------------------------------------------

  function control(el, step, key) {
    el.dataset.key = `${step.id}:${key}`;
    if (readOnly) el.disabled = true;
    return el;
  }

  function nameField(step) {
    const input = control(h("input", { type: "text", value: step.name || "", maxlength: "200", placeholder: "optional" }), step, "name");
    input.addEventListener("input", () => {
      step.name = input.value.trim() || undefined;
      changed();
    });
    return field(`Label of ${step.id}`, input);
  }

  function templates(channel, messageType) {
    const key = `${channel}/${messageType}`;
    if (!templateCache.has(key)) {
      const load = async () => {
        const items = [];
        let cursor;
        do {
          const page = await get("/v1/templates", { state: "PUBLISHED", channel, message_type: messageType, limit: 100, cursor });
          items.push(...page.items);
          cursor = page.next_cursor;
        } while (cursor && items.length < 500);
        return items;
      };
      templateCache.set(key, load().catch((error) => {
        templateCache.delete(key);
        throw error;
      }));
    }
    return templateCache.get(key);
  }

  function templatePicker(step, refName, channel, messageType, label) {
    const send = step.send;
    const current = send[refName]?.template_id || "";
    const picker = control(h("select", {}, h("option", { value: current }, current ? `${current} (loading…)` : "Loading templates…")), step, refName);
    const note = h("span", { class: "hint", id: nextId("hint") });
    picker.setAttribute("aria-describedby", note.id);
    templates(channel, messageType).then(
      (items) => {
        clear(picker);
        picker.append(h("option", { value: "" }, "— choose a published template —"));
        for (const t of items) {
          picker.append(h("option", { value: t.id }, `${t.name} (v${t.published_version ?? "?"}) — ${t.id}`));
        }
        if (current && !items.some((t) => t.id === current)) {
          picker.append(h("option", { value: current }, `${current} (not published for ${channel} ${messageType})`));
        }
        picker.value = current;
        note.textContent = items.length
          ? `${items.length} published ${channel} ${messageType} template${items.length === 1 ? "" : "s"}`
          : `No published ${channel} ${messageType} template: publish one first`;
      },
      (error) => {
        note.textContent = error instanceof ApiError && error.status === 403
          ? "This key cannot list templates (templates:read)."
          : `Templates could not be loaded: ${errorText(error)}`;
      },
    );
    picker.addEventListener("change", () => {
      send[refName] = picker.value ? { template_id: picker.value, version: 0 } : undefined;
      changed({ structural: true });
    });
    const wrap = field(label, picker);
    wrap.append(note);
    return wrap;
  }

  function sendEditor(step) {
    const send = step.send;
    const box = h("div", { class: "editor" });
    const channel = control(select(CHANNELS, send.channel || "EMAIL"), step, "channel");
    const type = control(select(MESSAGE_TYPES, send.message_type || "MESSAGE"), step, "message_type");
    const retype = () => {
      send.channel = channel.value;
      send.message_type = type.value;
      // A template belongs to one channel and message type: a change of either clears it.
      send.template = undefined;
      if (send.channel !== "RCS") {
        send.fallback = undefined;
        send.sms_template = undefined;
      } else if (!send.fallback) {
        send.fallback = "sms";
      }
      changed({ structural: true });
    };
    channel.addEventListener("change", retype);
    type.addEventListener("change", retype);
    box.append(h("div", { class: "row" }, field("Channel", channel), field("Message type", type)));
    box.append(templatePicker(step, "template", send.channel || "EMAIL", send.message_type || "MESSAGE", "Template (published)"));
    if (send.channel === "RCS") {
      const fallback = control(
        select([["none", "none — skip the contact"], ["sms", "sms — same text by SMS"], ["sms_custom", "sms_custom — an SMS template"]], send.fallback || "sms"),
        step,
        "fallback",
      );
      fallback.addEventListener("change", () => {
        send.fallback = fallback.value;
        if (fallback.value !== "sms_custom") send.sms_template = undefined;
        changed({ structural: true });
      });
      box.append(field("When the device is not RCS capable", fallback));
      if (send.fallback === "sms_custom") {
        box.append(templatePicker(step, "sms_template", "SMS", send.message_type || "MESSAGE", "SMS fallback template (published)"));
      }
    }
    const previewButton = h(
      "button",
      {
        type: "button",
        class: "small",
        "data-key": `${step.id}:preview`,
        "aria-disabled": send.template ? null : "true",
        title: send.template ? "Render the template with sample values" : "Choose a template first",
        onclick: () => (send.template ? preview(step) : announce("Choose a template first")),
      },
      "Preview",
    );
    box.append(previewButton);
    return box;
  }

  async function preview(step) {
    // A modal dialog outside the builder's tree: the builder re-renders on structural edits, and
    // an iframe moved in the DOM reloads.
    const ref = step.send.template;
    const dialog = previewDialog();
    const body = dialog.querySelector(".preview");
    dialog.querySelector("h2").textContent = `Preview of ${ref.template_id} (step ${step.id})`;
    body.replaceChildren("Rendering…");
    if (!dialog.open) dialog.showModal();
    try {
      const p = await post(`/v1/templates/${ref.template_id}/preview`, {
        fill_missing: true,
        contact: { first_name: "Ada", last_name: "Lovelace", email: "ada@example.com" },
      });
      clear(body);
      const content = p.content || {};
      body.append(h("p", { class: "preview-meta" }, `${p.channel} ${p.message_type}, version ${p.version}, ${p.units} ${String(p.billing_unit || "").toLowerCase()} unit${p.units === 1 ? "" : "s"}`));
      if (content.email) {
        body.append(h("p", { class: "preview-subject" }, h("strong", {}, "Subject: "), content.email.subject));
        if (content.email.html) {
          // Sandboxed (no scripts, no same-origin): the HTML of an email cannot touch the page.
          body.append(h("iframe", { class: "preview-frame", sandbox: "", title: `HTML of ${ref.template_id}`, srcdoc: content.email.html }));
        }
        if (content.email.text) body.append(h("pre", {}, content.email.text));
      } else if (content.sms) {
        body.append(h("pre", {}, content.sms.text));
      } else if (content.rcs) {
        body.append(h("pre", {}, content.rcs.text || JSON.stringify(content.rcs, null, 2)));
      }
      announce(`Preview of ${ref.template_id} ready`);
    } catch (error) {
      body.textContent = `Preview failed: ${errorText(error)}`;
    }
  }

  function waitEditor(step) {
    const parts = durationParts(step.wait.duration);
    const amount = control(h("input", { type: "number", min: "1", step: "1", value: String(parts.amount), inputmode: "numeric" }), step, "amount");
    const unit = control(select(UNITS, parts.unit), step, "unit");
    const update = () => {
      step.wait.duration = formatDuration(amount.value, unit.value);
      changed();
    };
    amount.addEventListener("input", update);
    unit.addEventListener("change", update);
    return h("div", { class: "editor row" }, field(`Wait duration of ${step.id}`, amount), field("Unit", unit));
  }

  function predicateKind(p) {
    if (!p) return "tag";
    if (p.field !== undefined) return "field";
    for (const k of ["tag", "consent", "engagement", "channel_used"]) if (p[k] !== undefined) return k;
    return "tag";
  }

  function sendIds() {
    return Array.from(walk(model.steps)).filter((s) => kindOf(s) === "send").map((s) => s.id);
  }

  function conditionEditor(step) {
    const cond = step.condition;
    const p = cond.predicate || (cond.predicate = { tag: "" });
    const kind = predicateKind(p);
    const box = h("div", { class: "editor" });
    const kindSelect = control(
      select(
        [["tag", "Contact has a tag"], ["field", "Contact field"], ["consent", "Consent"], ["engagement", "Engagement with an earlier message"], ["channel_used", "Channel an earlier message used"]],
        kind,
      ),
      step,
      "predicate",
    );
    kindSelect.addEventListener("change", () => {
      const defaults = {
        tag: { tag: "" },
        field: { field: "first_name", op: "eq", value: "" },
        consent: { consent: { channel: "EMAIL", message_type: "MESSAGE", status: "GRANTED" } },
        engagement: { engagement: { node_id: sendIds()[0], event: "opened" } },
        channel_used: { channel_used: { node_id: sendIds()[0], channel: "SMS" } },
      };
      cond.predicate = defaults[kindSelect.value];
      changed({ structural: true });
    });
    box.append(field(`Condition of ${step.id}`, kindSelect));
    if (kind === "tag") {
      const tag = control(h("input", { type: "text", value: p.tag || "", placeholder: "vip" }), step, "tag");
      tag.addEventListener("input", () => {
        p.tag = tag.value.trim();
        changed();
      });
      box.append(field("Tag", tag));
    } else if (kind === "field") {
      const listId = nextId("fields");
      const name = control(h("input", { type: "text", value: p.field || "", list: listId, placeholder: "first_name or fields.plan" }), step, "field");
      const op = control(select(OPERATORS, p.op || "eq"), step, "op");
      const value = control(h("input", { type: "text", value: p.value === undefined ? "" : Array.isArray(p.value) ? p.value.join(", ") : String(p.value?.timestamp ?? p.value) }), step, "value");
      const sync = () => {
        p.field = name.value.trim();
        p.op = op.value;
        p.value = fieldValue(p.field, op.value, value.value);
        if (p.value === undefined) delete p.value;
        value.disabled = readOnly || op.value === "exists";
        changed();
      };
      value.disabled = readOnly || op.value === "exists";
      name.addEventListener("input", sync);
      op.addEventListener("change", sync);
      value.addEventListener("input", sync);
      box.append(
        h("datalist", { id: listId }, BUILTIN_FIELDS.map((f) => h("option", { value: f }))),
        h("div", { class: "row" }, field("Field", name), field("Operator", op), field("Value", value, op.value === "in" ? "comma separated" : undefined)),
      );
    } else if (kind === "consent") {
      const c = p.consent;
      const ch = control(select(CHANNELS, c.channel || "EMAIL"), step, "consent-channel");
      const mt = control(select(MESSAGE_TYPES, c.message_type || "MESSAGE"), step, "consent-type");
      const st = control(select(["GRANTED", "REVOKED", "PENDING"], c.status || "GRANTED"), step, "consent-status");
      const sync = () => {
        Object.assign(c, { channel: ch.value, message_type: mt.value, status: st.value });
        changed();
      };
      [ch, mt, st].forEach((el) => el.addEventListener("change", sync));
      box.append(h("div", { class: "row" }, field("Consent channel", ch), field("Consent message type", mt), field("Consent status", st)));
    } else {
      const inner = p[kind];
      const ids = sendIds();
      const node = control(select(ids.length ? ids : [["", "(no SEND step yet)"]], inner.node_id || ids[0] || ""), step, `${kind}-node`);
      const second =
        kind === "engagement"
          ? control(select(["delivered", "opened", "clicked", "failed"], inner.event || "opened"), step, "event")
          : control(select(CHANNELS, inner.channel || "SMS"), step, "channel-used");
      const sync = () => {
        inner.node_id = node.value || undefined;
        if (kind === "engagement") inner.event = second.value;
        else inner.channel = second.value;
        changed();
      };
      node.addEventListener("change", sync);
      second.addEventListener("change", sync);
      if (!inner.node_id && ids[0]) inner.node_id = ids[0];
      box.append(h("div", { class: "row" }, field("Earlier SEND step", node), field(kind === "engagement" ? "Event" : "Channel used", second)));
    }
    return box;
  }

  function abEditor(step) {
    const variants = step.ab_test.variants;
    const box = h("div", { class: "editor" });
    const sumId = nextId("sum");
    const sumLine = h("p", { class: "weight-sum", id: sumId, role: "status" });
    const showSum = () => {
      const total = variants.reduce((n, v) => n + (Number(v.weight) || 0), 0);
      const ok = total === 100;
      sumLine.className = `weight-sum ${ok ? "ok" : "bad"}`;
      sumLine.textContent = ok ? "Weights sum to 100 ✓" : `Weights sum to ${total}; they must sum to 100`;
      for (const input of box.querySelectorAll("input.weight")) input.setAttribute("aria-invalid", ok ? "false" : "true");
    };
    const table = h("div", { class: "variants", role: "group", "aria-label": `Variants of ${step.id}` });
    variants.forEach((v, i) => {
      const name = control(h("input", { type: "text", value: v.name || "", maxlength: "64", class: "variant-name" }), step, `variant-${i}-name`);
      const weight = control(h("input", { type: "number", min: "1", max: "100", step: "1", value: String(v.weight ?? 0), class: "weight", "aria-describedby": sumId, inputmode: "numeric" }), step, `variant-${i}-weight`);
      name.addEventListener("input", () => {
        v.name = name.value.trim();
        changed();
      });
      name.addEventListener("change", () => render());
      weight.addEventListener("input", () => {
        v.weight = Math.floor(Number(weight.value) || 0);
        showSum();
        changed();
      });
      weight.addEventListener("change", () => render());
      const removeButton = toolButton(
        "✕",
        `Remove variant ${v.name || i + 1} of ${step.id}`,
        `${step.id}:variant-${i}-remove`,
        variants.length > 2,
        "An A/B test has at least 2 variants",
        () => {
          snapshot();
          variants.splice(i, 1);
          changed({ structural: true, focusKey: `${step.id}:add-variant` });
        },
      );
      table.append(
        h("div", { class: "variant row" }, field(`Variant ${i + 1} name`, name), field(`Variant ${i + 1} weight (%)`, weight), readOnly ? null : removeButton),
      );
    });
    box.append(table, sumLine);
    if (!readOnly) {
      const canAdd = variants.length < 4;
      const add = toolButton("+ Variant", `Add a variant to ${step.id}`, `${step.id}:add-variant`, canAdd, "An A/B test has at most 4 variants", () => {
        snapshot();
        const used = new Set(variants.map((v) => v.name));
        const name = ["A", "B", "C", "D", "E"].find((n) => !used.has(n)) || `V${variants.length + 1}`;
        variants.push({ name, weight: 0, steps: [{ id: newId("end"), end: {} }] });
        changed({ structural: true });
      });
      add.classList.add("small");
      add.textContent = "+ Variant";
      box.append(add);
    }
    showSum();
    return box;
  }

  function tagEditor(step) {
    const tag = control(h("input", { type: "text", value: step.tag.tag || "", placeholder: "engaged" }), step, "tag");
    const action = control(select(["ADD", "REMOVE"], step.tag.action || "ADD"), step, "action");
    tag.addEventListener("input", () => {
      step.tag.tag = tag.value.trim();
      changed();
    });
    action.addEventListener("change", () => {
      step.tag.action = action.value;
      changed();
    });
    return h("div", { class: "editor row" }, field(`Tag of ${step.id}`, tag), field("Action", action));
  }

  function endEditor() {
    return h("p", { class: "hint" }, "The execution completes here.");
  }

  render();

  return {
    element: root,
    flow: () => ({ steps: structuredClone(model.steps) }),
    /** errors: [{node_id, field, rule, message}] from POST /validate (null node ids are skipped). */
    setErrors(list) {
      errors = new Map();
      for (const e of list || []) {
        if (!e.node_id) continue;
        if (!errors.has(e.node_id)) errors.set(e.node_id, []);
        errors.get(e.node_id).push(e);
      }
      render();
    },
    undo,
  };
}

function fieldValue(name, op, text) {
  if (op === "exists") return undefined;
  const typed = (raw) => {
    const t = raw.trim();
    if (!name.startsWith("fields.")) return t;
    if (t === "true" || t === "false") return t === "true";
    if (t !== "" && !Number.isNaN(Number(t))) return Number(t);
    return t;
  };
  if (op === "in") return text.split(",").map(typed).filter((v) => v !== "");
  return typed(text);
}

/** The one template preview dialog of the page (created on first use). */
function previewDialog() {
  let dialog = document.getElementById("template-preview");
  if (dialog) return dialog;
  const titleId = nextId("preview-title");
  dialog = h(
    "dialog",
    { id: "template-preview", class: "preview-dialog", "aria-labelledby": titleId },
    h("div", { class: "dialog-head" }, h("h2", { id: titleId }, "Preview"), h("button", { type: "button", onclick: () => dialog.close() }, "Close")),
    h("div", { class: "preview", role: "region", "aria-label": "Rendered template" }),
  );
  document.body.append(dialog);
  return dialog;
}
