// chunkvol dashboard: polls /api/state and renders it. No libraries.
"use strict";

const POLL_MS = 1000;
// Removed groups kept on the map, as many as the server remembers.
const MAX_REMOVED = 64;
// Groups seen (or reported removed), by start: shown as "removed" once gone.
const known = new Map();

function human(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  n = Number(n) || 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(2) : String(n)) + units[i];
}

function hex(n) { return "0x" + Number(n).toString(16); }

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderMap(groups, removed) {
  const now = new Set();
  // Removed lately (the server remembers), unless the start is reused.
  for (const g of removed) if (!known.has(g.start)) known.set(g.start, Object.assign({ used_bytes: 0, fill: 0 }, g));
  for (const g of groups) { known.set(g.start, g); now.add(g.start); }
  const gone = [...known.keys()].filter(s => !now.has(s));
  for (const s of gone.slice(0, Math.max(0, gone.length - MAX_REMOVED))) known.delete(s);
  const map = document.getElementById("map");
  map.replaceChildren();
  const starts = [...known.keys()].sort((a, b) => a - b);
  for (const s of starts) {
    const g = known.get(s);
    const state = now.has(s) ? g.state : "removed";
    const cell = el("div", {
      "class": "cell type-" + g.type + " state-" + state,
      "data-start": String(g.start),
      "data-type": g.type,
      "data-profile": g.profile,
      "data-state": state,
      "title": `${hex(g.start)} ${g.type} ${g.profile} ${human(g.length)}, ` +
               `${human(g.used_bytes)} used: ${state}`,
    });
    const fill = el("div", { "class": "fill" });
    fill.style.height = (state === "removed" ? 0 : Math.round(100 * g.fill)) + "%";
    cell.appendChild(fill);
    map.appendChild(cell);
  }
}

function jobLine(name, j, done, total, unit) {
  const div = el("div", { "class": "job", "id": "job-" + name, "data-state": j.state || "never" });
  div.appendChild(el("b", {}, name + " "));
  div.appendChild(el("span", { "class": "state" }, (j.state || "never") + " "));
  if (total > 0) {
    const p = el("progress", { "max": String(total), "value": String(Math.min(done, total)) });
    div.appendChild(p);
    const amount = unit === "groups" ? `${done}/${total} groups` : `${human(done)}/${human(total)}`;
    let text = ` ${amount}`;
    if (j.rate_bytes_per_s !== undefined && j.duration_s > 0) text += `, ${human(j.rate_bytes_per_s)}/s`;
    if (j.eta_s !== undefined && j.eta_s !== null) text += `, ETA ${j.eta_s} s`;
    div.appendChild(el("span", {}, text));
  }
  return div;
}

function renderJobs(jobs) {
  const box = document.getElementById("jobs");
  box.replaceChildren();
  const s = jobs.scrub || {};
  box.appendChild(jobLine("scrub", s, s.bytes_scrubbed || 0, s.bytes_total || 0, "bytes"));
  const b = jobs.balance || {};
  box.appendChild(jobLine("balance", b, b.block_groups_done || 0, b.block_groups_total || 0, "groups"));
  const r = jobs.replace || {};
  box.appendChild(jobLine("replace", r, r.block_groups_done || 0, r.block_groups_total || 0, "groups"));
  for (const t of jobs.tasks || []) {
    const j = Object.assign({ state: "running" }, t);
    box.appendChild(jobLine(`${t.kind} ${t.subject}`, j, t.done_bytes, t.total_bytes, "bytes"));
  }
}

function renderDevices(devs) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const d of devs) {
    const tr = el("tr", { "data-devid": String(d.devid) });
    const e = d.errors || {};
    const cells = [
      [d.devid, "num"], [d.path, ""], [d.health, "health-" + d.health],
      [human(d.size_bytes), "num"], [human(d.allocated_bytes), "num"],
      [e.read_errs, "num"], [e.write_errs, "num"], [e.flush_errs, "num"],
      [e.corruption_errs, "num"], [e.generation_errs, "num"],
    ];
    for (const [v, c] of cells) tr.appendChild(el("td", { "class": c }, v === undefined ? "-" : String(v)));
    body.appendChild(tr);
  }
}

function renderErrors(errs) {
  const body = document.querySelector("#errors tbody");
  body.replaceChildren();
  const rows = (errs.scrub || []).map(e => ["scrub", e]).concat((errs.replace || []).map(e => ["replace", e]));
  for (const [by, e] of rows) {
    const tr = el("tr");
    for (const v of [by, e.kind, e.devid, hex(e.physical), hex(e.logical), e.volume || "-",
                     e.offset_bytes === null || e.offset_bytes === undefined ? "-" : String(e.offset_bytes),
                     e.repaired === undefined ? "-" : (e.repaired ? "yes" : "no")]) {
      tr.appendChild(el("td", {}, String(v)));
    }
    body.appendChild(tr);
  }
}

async function tick() {
  try {
    const r = await fetch("/api/state", { cache: "no-store" });
    const st = await r.json();
    renderMap(st.block_groups, st.removed_block_groups || []);
    renderJobs(st.jobs);
    renderDevices(st.devices);
    renderErrors(st.errors);
    document.getElementById("summary").textContent =
      `generation ${st.generation} · ${st.block_groups.length} block groups · ` +
      `${st.devices.length} devices · updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.renders = String(Number(document.body.dataset.renders) + 1);
  } catch (e) {
    document.getElementById("summary").textContent = "cannot reach the server: " + e;
  }
  setTimeout(tick, POLL_MS);
}

tick();
