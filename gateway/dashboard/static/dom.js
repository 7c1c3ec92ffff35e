// Small DOM helpers: element building, money and time formatting, announcements.

/** h("button", {class: "x", onclick: fn, "aria-label": "..."}, "text", child, ...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name === "value" && "value" in el) {
      el.value = value;
    } else if (name === "checked" || name === "selected" || name === "disabled") {
      el[name] = Boolean(value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

/** Replace the children of `el` (null, false and undefined children are skipped). */
export function fill(el, ...children) {
  return append(clear(el), children);
}

let uid = 0;
/** A unique element id, for label/aria wiring. */
export function nextId(prefix = "f") {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** A labelled control: <div class="field"><label for=id>text</label>control</div>. */
export function field(labelText, control, hint) {
  if (!control.id) control.id = nextId("c");
  const parts = [h("label", { for: control.id }, labelText), control];
  if (hint) {
    const hintEl = h("span", { class: "hint", id: nextId("hint") }, hint);
    control.setAttribute("aria-describedby", hintEl.id);
    parts.push(hintEl);
  }
  return h("div", { class: "field" }, parts);
}

export function select(options, value, attrs = {}) {
  const el = h("select", attrs);
  for (const option of options) {
    const [optionValue, label] = Array.isArray(option) ? option : [option, option];
    el.append(h("option", { value: optionValue, selected: optionValue === value }, label));
  }
  if (value !== undefined && value !== null) el.value = value;
  return el;
}

const EUR = new Intl.NumberFormat(undefined, { style: "currency", currency: "EUR" });
export function money(cents) {
  return EUR.format((Number(cents) || 0) / 100);
}

export function count(n) {
  return new Intl.NumberFormat().format(Number(n) || 0);
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

/** Polite announcement for screen readers (and visible in the status bar). */
export function announce(message) {
  const region = document.getElementById("announcer");
  if (!region) return;
  region.textContent = "";
  window.setTimeout(() => {
    region.textContent = message;
  }, 30);
}

export function errorText(error) {
  if (!error) return "";
  const details = (error.details || []).map((d) => `${d.field}: ${d.message}`);
  return [error.message, ...details].join(" — ");
}

export function stateBadge(state) {
  return h("span", { class: `badge state-${String(state || "").toLowerCase()}`, "data-state": state }, state);
}

export function triggerKind(trigger) {
  if (!trigger) return "—";
  if (trigger.manual) return "manual";
  if (trigger.api) return "API";
  if (trigger.schedule) return "scheduled";
  if (trigger.event) return "event";
  return "—";
}
