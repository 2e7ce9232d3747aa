// The operator's console: the API's own routes (admin, SSE), with the token the person
// gives (sessionStorage), so it shows nothing the API would not show them.
"use strict";

const $ = (selector) => document.querySelector(selector);
const COLORS = ["#2f6fde", "#c2362b", "#22855b", "#a26b00", "#7b4bd6", "#0e8a9a", "#d6457b", "#5b6475"];
const MAX_EVENTS = 200;
const LAG_SAMPLES = 90;
// the deployment's bounded contexts, written into the page by the API
const CONTEXTS = (document.querySelector('meta[name="cqrs-contexts"]')?.content || "").split(",").filter(Boolean);

const state = {
  token: sessionStorage.getItem("cqrs-token") || "",
  source: null,
  lastId: null,
  paused: false,
  buffered: [],
  lag: {},          // projection -> [{events, seconds}]
  timers: [],
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    else if (name === "text") node.textContent = value;
    else if (name === "style") Object.assign(node.style, value);  // CSSOM: no inline style attribute
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.detail ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const body = isJson ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function claims(token) {
  try {
    return JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  } catch {
    return {};
  }
}

// A section polls its route; a refusal (403) or an outage is shown in the section.
function poll(section, every, load) {
  const errorBox = section.querySelector("[data-error]");
  const run = async () => {
    try {
      await load();
      if (errorBox) errorBox.textContent = "";
    } catch (err) {
      if (errorBox) errorBox.textContent = err.status === 403 ? `not for this token: ${err.message}` : err.message;
      if (err.status === 401) signOut();
    }
  };
  run();
  state.timers.push(setInterval(run, every));
}

// ---------------------------------------------------------------- events, live

async function connectEvents() {
  if (state.source) state.source.close();
  $("#events-state").textContent = "connecting";
  let ticket;
  try {
    ticket = (await api("/api/v1/stream-tickets", { method: "POST" })).ticket;
  } catch (err) {
    $("#events-state").textContent = `not connected: ${err.message}`;
    if (err.status !== 403 && err.status !== 401) setTimeout(connectEvents, 3000);
    return;
  }
  const query = new URLSearchParams({ ticket });
  const context = $("#filter-context").value;
  const aggregate = $("#filter-aggregate").value.trim();
  const type = $("#filter-type").value.trim();
  if (context) query.append("context", context);
  if (aggregate) query.append("aggregate_id", aggregate);
  if (type) query.append("event_type", type);
  if (state.lastId) query.append("last_event_id", state.lastId);
  const source = new EventSource(`/api/v1/events/stream?${query}`);
  state.source = source;
  source.addEventListener("subscribed", () => { $("#events-state").textContent = "live"; });
  source.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    if (event.type !== "event") return;
    state.lastId = event.id;
    if (state.paused) {
      state.buffered.push(event);
      $("#events-state").textContent = `paused, ${state.buffered.length} waiting`;
    } else {
      showEvent(event);
    }
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED && state.source === source) {
      $("#events-state").textContent = "reconnecting";
      setTimeout(connectEvents, 2000);  // a ticket serves one request: a new one
    }
  });
}

function showEvent(event) {
  const body = $("#event-table tbody");
  const at = (event.metadata.occurred_at || "").replace("T", " ").slice(0, 23);
  const row = el("tr", { class: "fresh", "data-aggregate": event.aggregate_id, "data-type": event.event_type },
    el("td", { text: at }),
    el("td", { text: event.event_type }),
    el("td", {}, el("a", { class: "aggregate", text: event.aggregate_id,
      onclick: () => showHistory(event.context, event.aggregate_id) })),
    el("td", { text: event.aggregate_version }),
    el("td", { text: event.metadata.actor || "" }),
    el("td", { text: `${event.record.partition}:${event.record.offset}` }));
  body.prepend(row);
  while (body.rows.length > MAX_EVENTS) body.deleteRow(body.rows.length - 1);
}

async function showHistory(context, id) {
  $("#history").hidden = false;
  $("#history-id").textContent = id;
  const list = $("#history-list");
  list.replaceChildren(el("li", { text: "loading" }));
  try {
    const found = await api(`/api/v1/${encodeURIComponent(context)}/${encodeURIComponent(id)}/events`);
    list.replaceChildren(...(found.items || found.events || []).map((e) =>
      el("li", { text: `v${e.aggregate_version ?? e.version} ${e.event_type ?? e.type} ${JSON.stringify(e.payload ?? {})}` })));
  } catch (err) {
    list.replaceChildren(el("li", { class: "error", text: err.message }));
  }
}

// ---------------------------------------------------------------- projections and lag

async function loadProjections() {
  const found = await api("/api/v1/admin/projections");
  const body = $("#projection-table tbody");
  const rows = [];
  for (const [name, p] of Object.entries(found.projections)) {
    const series = (state.lag[name] = state.lag[name] || []);
    series.push({ events: p.events_behind || 0, seconds: p.seconds_behind || 0 });
    if (series.length > LAG_SAMPLES) series.shift();
    const building = p.building;
    let rebuild = "";
    if (building) {
      const share = building.total ? Math.min(1, (building.done || 0) / building.total) : 0;
      rebuild = el("div", { title: `v${building.version} ${building.phase || ""}` },
        el("div", { class: "bar" }, el("i", { style: { width: `${(share * 100).toFixed(1)}%` } })),
        `v${building.version} ${building.phase || "starting"} ${building.done || 0}/${building.total || "?"}`);
    }
    rows.push(el("tr", { "data-projection": name },
      el("td", { text: name }),
      el("td", { text: `v${p.live_version}` }),
      el("td", { class: "lag-events", text: p.events_behind }),
      el("td", { text: (p.seconds_behind || 0).toFixed(1) }),
      el("td", { text: p.dead_lettered }),
      el("td", { text: p.parked ?? 0 }),
      el("td", {}, rebuild),
      el("td", {},
        el("button", { class: "rebuild", disabled: building ? "" : null, onclick: () => rebuildProjection(name) }, "Rebuild"),
        " ",
        el("button", { class: "rollback", disabled: building ? "" : null, onclick: () => rollbackProjection(name) }, "Roll back"))));
  }
  body.replaceChildren(...rows);
  drawChart($("#lag-events"), "events");
  drawChart($("#lag-seconds"), "seconds");
  $("#lag-legend").replaceChildren(...Object.keys(state.lag).map((name, i) =>
    el("li", {}, el("i", { style: { background: COLORS[i % COLORS.length] } }), name)));
}

function drawChart(svg, field) {
  const names = Object.keys(state.lag);
  const top = Math.max(1, ...names.flatMap((n) => state.lag[n].map((s) => s[field])));
  const lines = names.map((name, i) => {
    const series = state.lag[name];
    const offset = LAG_SAMPLES - series.length;
    const points = series.map((s, j) =>
      `${(((offset + j) / (LAG_SAMPLES - 1)) * 300).toFixed(1)},${(88 - (s[field] / top) * 84).toFixed(1)}`);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.dataset.projection = name;
    return line;
  });
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", "4");
  label.setAttribute("y", "11");
  label.setAttribute("font-size", "9");
  label.setAttribute("fill", "#6b7385");
  label.textContent = `max ${field === "seconds" ? top.toFixed(1) + " s" : top}`;
  svg.replaceChildren(...lines, label);
}

async function rebuildProjection(name) {
  if (!confirm(`Rebuild ${name} from the log into a new version, and swap it in when caught up?`)) return;
  try {
    await api(`/api/v1/admin/projections/${encodeURIComponent(name)}/rebuild`, { method: "POST" });
  } catch (err) {
    alert(err.message);
  }
  loadProjections().catch(() => {});
}

async function rollbackProjection(name) {
  if (!confirm(`Make the previous version of ${name} live again?`)) return;
  try {
    await api(`/api/v1/admin/projections/${encodeURIComponent(name)}/rollback`, { method: "POST" });
  } catch (err) {
    alert(err.message);
  }
  loadProjections().catch(() => {});
}

// ---------------------------------------------------------------- dead letters

async function loadDeadLetters() {
  const [found, parked, actions] = await Promise.all([
    api("/api/v1/admin/dead-letters?state=unresolved&limit=100"),
    api("/api/v1/admin/dead-letters/parked?limit=500"),
    api("/api/v1/admin/dead-letters/actions?limit=10"),
  ]);
  const held = new Map(parked.items.map((k) => [`${k.consumer}/${k.dead_letter.partition}/${k.dead_letter.offset}`, k]));
  $("#dead-count").textContent = `${found.items.length} unresolved, ${parked.items.length} keys parked`;
  $("#dead-table tbody").replaceChildren(...found.items.map((d) => {
    const at = `${d.consumer}/${d.partition}/${d.offset}`;
    const key = held.get(at);
    const buttons = d.state === "parked" ? [
      el("button", { class: "retry", onclick: (e) => act(e.target, at, "retry") }, "Retry"), " ",
      el("button", { class: "skip", onclick: (e) => act(e.target, at, "skip") }, "Skip"),
    ] : [];
    return el("tr", { "data-dead-letter": at, "data-key": d.key || "" },
      el("td", { text: d.consumer }),
      el("td", { text: `${d.partition}:${d.offset}` }),
      el("td", { text: d.key || "" }),
      el("td", { class: `state-${d.state}`, text: d.state }),
      el("td", { text: key ? key.held : "" }),
      el("td", { text: (d.error || "").slice(0, 200), title: d.source }),
      el("td", {}, ...buttons));
  }));
  $("#actions").replaceChildren(...actions.items.map((a) => el("li", {
    text: `${a.requested_at.slice(0, 19).replace("T", " ")} ${a.actor} ${a.action} ${a.consumer} ` +
      `${a.dead_letter.partition}:${a.dead_letter.offset}: ${a.outcome}` +
      (a.outcome === "pending" ? "" : `, ${a.applied} applied`) + (a.error ? ` (${a.error.slice(0, 120)})` : ""),
  })));
}

async function act(button, at, action) {
  const row = button.closest("tr");
  row.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    const done = await api(`/api/v1/admin/dead-letters/${at}/${action}`, { method: "POST" });
    if (done.outcome === "failed") alert(`still failing: ${done.error}`);
  } catch (err) {
    alert(err.message);
  }
  loadDeadLetters().catch(() => {});
}

// ---------------------------------------------------------------- what runs

async function loadProcessor() {
  const found = await api("/api/v1/admin/processor");
  const instances = found.instances;
  $("#partition-grid").replaceChildren(...found.partitions.map((p) => el("div", {
    class: p.owner ? "partition" : "partition unowned",
    title: p.owner ? `${p.owner.url} generation ${p.owner.generation}` : "no owner",
    "data-partition": p.partition,
  }, el("b", { text: `p${p.partition}` }),
    p.owner ? `#${instances.indexOf(p.owner.instance) + 1} gen ${p.owner.generation}` : "unowned")));
  $("#instances").textContent = instances.map((i, n) => `#${n + 1} ${i}`).join("  ·  ") +
    (found.unowned ? `  ·  ${found.unowned} unowned` : "");
}

async function loadJobs() {
  const found = await api("/api/v1/admin/jobs");
  $("#job-table tbody").replaceChildren(...found.jobs.map((j) => el("tr", { "data-job": j.name },
    el("td", { text: j.name }),
    el("td", { text: `${j.state}` }),
    el("td", { text: j.members.length, title: j.members.map((m) => `${m.client_id}@${m.host}`).join("\n") }),
    el("td", { text: j.behind }),
    el("td", { class: j.halted ? "error" : "", text: j.halted ? j.halted.error || "halted" : "" }))));
}

// ---------------------------------------------------------------- sign-in

function signOut() {
  sessionStorage.removeItem("cqrs-token");
  state.token = "";
  state.timers.forEach(clearInterval);
  state.timers = [];
  if (state.source) state.source.close();
  state.source = null;
  show();
}

function show() {
  const signedIn = Boolean(state.token);
  $("#sign-in").hidden = signedIn;
  $("#console").hidden = !signedIn;
  $("#sign-out").hidden = !signedIn;
  if (!signedIn) return;
  const who = claims(state.token);
  $("#who").textContent = [who.sub, who.role, who.tenant].filter(Boolean).join(" · ");
  connectEvents();
  poll($("#projections"), 2000, loadProjections);
  poll($("#dead-letters"), 3000, loadDeadLetters);
  poll($("#processor"), 5000, loadProcessor);
  poll($("#jobs"), 5000, loadJobs);
}

function start() {
  if (location.hash.startsWith("#token=")) {
    state.token = decodeURIComponent(location.hash.slice("#token=".length));
    sessionStorage.setItem("cqrs-token", state.token);
    history.replaceState(null, "", location.pathname);
  }
  for (const context of CONTEXTS) $("#filter-context").append(el("option", { value: context, text: context }));
  $("#use-token").addEventListener("click", () => {
    state.token = $("#token").value.trim();
    if (state.token) sessionStorage.setItem("cqrs-token", state.token);
    show();
  });
  $("#sign-out").addEventListener("click", signOut);
  $("#event-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    state.lastId = null;
    $("#event-table tbody").replaceChildren();
    connectEvents();
  });
  $("#pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("#pause").textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) {
      state.buffered.splice(0).forEach(showEvent);
      $("#events-state").textContent = "live";
    }
  });
  $("#history-close").addEventListener("click", () => { $("#history").hidden = true; });
  show();
}

document.addEventListener("DOMContentLoaded", start);
