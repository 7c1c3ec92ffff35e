// The dashboard shell: sign-in, a hash router (#/campaigns, #/campaigns/<id>, #/campaigns/<id>/edit)
// and the views. The URL never carries the key; it lives in sessionStorage (see api.js).

import { ApiError, clearKey, getKey, request, setKey } from "./api.js";
import { campaignsView } from "./campaigns.js";
import { detailView } from "./detail.js";
import { errorText, field, fill, h } from "./dom.js";
import { editorView } from "./editor.js";

const main = document.getElementById("main");
const signOutButton = document.getElementById("sign-out");
const nav = document.getElementById("nav");
let cleanup = null;
let signInNotice = "";

function navigate(hash, { reload = false } = {}) {
  if (window.location.hash === hash) {
    if (reload) route();
  } else {
    window.location.hash = hash;
  }
}

function focusHeading() {
  const heading = main.querySelector("h1");
  if (heading) heading.focus({ preventScroll: false });
}

function signInView() {
  signOutButton.hidden = true;
  nav.hidden = true;
  const key = h("input", { type: "password", autocomplete: "off", spellcheck: "false", required: true, placeholder: "shoal_k…" });
  const status = h("p", { class: "form-status", role: "alert" }, signInNotice);
  signInNotice = "";
  const form = h(
    "form",
    {
      class: "sign-in panel",
      "aria-labelledby": "sign-in-title",
      onsubmit: async (event) => {
        event.preventDefault();
        const value = key.value.trim();
        if (!value) {
          status.textContent = "Paste an API key.";
          return;
        }
        status.textContent = "Checking the key…";
        try {
          await request("GET", "/v1/campaigns", { query: { limit: 1 }, key: value });
        } catch (error) {
          if (error instanceof ApiError && error.status === 401) status.textContent = "This API key is not valid.";
          else if (error instanceof ApiError && error.status === 403) status.textContent = "This key may not read campaigns: it needs the campaigns:read (or campaigns:write) scope.";
          else status.textContent = `The key could not be checked: ${errorText(error)}`;
          key.focus();
          return;
        }
        setKey(value);
        key.value = "";
        if (!window.location.hash || window.location.hash === "#/") window.location.hash = "#/campaigns";
        route();
      },
    },
    h("h1", { id: "sign-in-title", tabindex: "-1" }, "Sign in"),
    h("p", {}, "Paste an API key of your workspace. It stays in this browser tab (session storage) and is sent only as an Authorization header."),
    field("API key", key),
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    status,
  );
  fill(main, form);
  key.focus();
}

async function route() {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  if (!getKey()) {
    signInView();
    return;
  }
  signOutButton.hidden = false;
  nav.hidden = false;
  const [path, search] = (window.location.hash.replace(/^#/, "") || "/campaigns").split("?");
  const query = new URLSearchParams(search || "");
  const parts = path.split("/").filter(Boolean);
  const onList = parts.length <= 1;
  for (const link of nav.querySelectorAll("a")) {
    if (onList && link.getAttribute("href") === "#/campaigns") link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const announcer = document.getElementById("announcer");
  if (announcer) announcer.textContent = "";
  main.setAttribute("aria-busy", "true");
  fill(main, h("p", { class: "loading" }, "Loading…"));
  const context = { navigate, query };
  try {
    if (parts[0] === "campaigns" && parts[1] && parts[2] === "edit") {
      cleanup = await editorView(main, parts[1], context);
    } else if (parts[0] === "campaigns" && parts[1]) {
      cleanup = await detailView(main, parts[1], context);
    } else {
      cleanup = await campaignsView(main, context);
    }
    focusHeading();
  } catch (error) {
    if (!getKey()) return; // a 401 signed the page out; the sign-in form is showing
    const text = error instanceof ApiError && error.status === 404 ? "Not found in this workspace." : errorText(error);
    fill(main, h("h1", { tabindex: "-1" }, "Something went wrong"), h("p", { role: "alert" }, text), h("p", {}, h("a", { href: "#/campaigns" }, "Back to the campaigns")));
    focusHeading();
  } finally {
    main.removeAttribute("aria-busy");
  }
}

signOutButton.addEventListener("click", () => {
  clearKey();
  signInNotice = "Signed out.";
  route();
});

window.addEventListener("shoal:signed-out", () => {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  signInNotice = "The API key was refused (401): sign in again.";
  signInView();
});
window.addEventListener("hashchange", route);
route();
