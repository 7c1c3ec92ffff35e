// The REST API as the dashboard calls it: the API key lives in sessionStorage only (never in the
// URL) and goes out as `Authorization: Bearer`. A 401 signs the page out.

const KEY = "shoal.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error || "error";
    this.details = body?.details || [];
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY);
}

/** A hint that names the key without revealing its secret: `shoal_kabc…`. */
export function keyHint() {
  const key = getKey() || "";
  const [prefix, id] = key.split("_");
  return id ? `${prefix}_${id}_…` : "your API key";
}

export async function request(method, path, { body, query, key } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json", Authorization: `Bearer ${key ?? getKey() ?? ""}` };
  const init = { method, headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const reply = await fetch(url, init);
  const text = await reply.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: "bad_response", message: text.slice(0, 200) };
    }
  }
  if (reply.status === 401 && key === undefined) {
    clearKey();
    window.dispatchEvent(new CustomEvent("shoal:signed-out", { detail: data?.message }));
  }
  if (!reply.ok) throw new ApiError(reply.status, data);
  return data;
}

export const get = (path, query) => request("GET", path, { query });
export const post = (path, body) => request("POST", path, { body });
export const patch = (path, body) => request("PATCH", path, { body });

let config = null;

/** Unauthenticated page settings (`GET /dashboard/config.json`): where Jaeger is. */
export async function dashboardConfig() {
  if (config === null) {
    try {
      const reply = await fetch("/dashboard/config.json", { cache: "no-store" });
      config = reply.ok ? await reply.json() : {};
    } catch {
      config = {};
    }
  }
  return config;
}

export function traceUrl(cfg, traceId) {
  const base = (cfg.jaeger_url || "http://localhost:16686").replace(/\/+$/, "");
  return `${base}/trace/${encodeURIComponent(traceId)}`;
}
