// The farm's web page (issue #14, item 3): views chosen by the URL's hash (#/jobs,
// #/job/ID, #/batch/ID, #/farm). Each view's start() returns a stop() that aborts its
// streams and timers and revokes its object URLs. Text from the API is set as textContent.
"use strict";

const FINAL = new Set(["succeeded", "failed", "canceled", "expired", "deleted"]);
const MAX_STREAMS = 4;  // live rows streamed at once: a browser opens 6 connections a host
const LIST_REFRESH_MS = 5000;  // the jobs table is listed again this often (new jobs, the rest)
const FARM_REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);
let stopView = () => {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child ?? "");
  return node;
}

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
  $("error").hidden = !error;
}

function percent(fraction) { return `${Math.round((fraction || 0) * 100)}%`; }

function queueText(position, eta) {
  if (position == null && eta == null) return "";
  return [position != null ? `#${position}` : "", eta != null ? `~${Math.round(eta)} s` : ""]
    .filter(Boolean).join(" ");
}

// ---- jobs: the submit forms and the live table ----

function jobRequest() {
  const body = {prompt: $("prompt").value, track: $("track").value};
  const [width, height] = $("size").value.split("x").map(Number);
  Object.assign(body, {width, height});
  if ($("model").value.trim()) body.model = $("model").value.trim();
  for (const name of ["frames", "steps", "seed", "priority"]) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  return body;
}

function startJobs() {
  const rows = new Map();  // job id -> {row, cells, stream: AbortController|null, thumb}
  const tbody = $("jobs").querySelector("tbody");
  let timer = null;

  function rowFor(job) {
    let entry = rows.get(job.id);
    if (!entry) {
      const cells = {thumb: el("td"), state: el("td", {class: "state"}), progress: el("td"),
                     queue: el("td")};
      const link = el("a", {href: `#/job/${job.id}`}, job.id);
      const row = el("tr", {"data-job": job.id}, cells.thumb, el("td", {}, link),
                     el("td", {class: "prompt"}, job.prompt), cells.state, cells.progress,
                     cells.queue, el("td", {}, new Date(job.created_at).toLocaleTimeString()));
      entry = {row, cells, stream: null, thumb: null};
      rows.set(job.id, entry);
    }
    update(entry, {state: job.state, progress: job.progress});
    return entry;
  }

  function update(entry, {state, progress, queue}) {
    if (state) {
      entry.cells.state.textContent = state;
      entry.row.dataset.state = state;
    }
    if (progress != null) entry.cells.progress.textContent = percent(progress);
    if (queue) entry.cells.queue.textContent = queueText(queue.queue_position, queue.eta_s);
    if (state === "succeeded" && !entry.thumb) showThumbnail(entry);
    if (FINAL.has(state)) entry.cells.queue.textContent = "";
  }

  async function showThumbnail(entry) {
    entry.thumb = {revoke() {}};
    try {
      entry.thumb = await farmApi.mediaUrl(`/v1/jobs/${entry.row.dataset.job}/thumbnail.jpg`);
      entry.cells.thumb.replaceChildren(el("img", {src: entry.thumb.url, alt: "thumbnail"}));
    } catch (error) { entry.cells.thumb.textContent = "-"; }
  }

  function follow(id) {  // the job's event stream drives its row until the job ends
    const entry = rows.get(id);
    entry.stream = new AbortController();
    farmApi.stream(`/v1/jobs/${id}/stream`, (type, data) => {
      if (type === "state" || type === "done") update(entry, {state: data.state});
      else if (type === "progress") update(entry, {progress: data.job_progress});
      else if (type === "queue") update(entry, {queue: data});
      if (type === "done" && data.state === "succeeded") update(entry, {progress: 1});
    }, entry.stream.signal).catch(() => {}).finally(() => {
      entry.stream = null;
      followMore();
    });
  }

  function followMore() {
    const streaming = [...rows.values()].filter((e) => e.stream).length;
    const waiting = [...rows.entries()].filter(([, e]) => !e.stream && !FINAL.has(e.row.dataset.state));
    for (const [id] of waiting.slice(0, Math.max(0, MAX_STREAMS - streaming))) follow(id);
  }

  async function list() {
    try {
      const page = await farmApi.json("/v1/jobs?limit=25");
      tbody.replaceChildren(...page.items.map((job) => rowFor(job).row));
      followMore();
    } catch (error) { showError(error); }
  }

  list();
  timer = setInterval(list, LIST_REFRESH_MS);
  startJobs.added = async (id) => {  // a job just submitted: its row at once, streamed first
    rowFor(await farmApi.json(`/v1/jobs/${id}`));
    tbody.prepend(rows.get(id).row);
    if (!rows.get(id).stream && !FINAL.has(rows.get(id).row.dataset.state)) follow(id);
  };
  return () => {
    clearInterval(timer);
    for (const entry of rows.values()) {
      entry.stream?.abort();
      entry.thumb?.revoke();
    }
    startJobs.added = null;
  };
}

async function submitJob(event) {
  event.preventDefault();
  showError(null);
  try {
    const accepted = await farmApi.post("/v1/jobs", jobRequest());
    await startJobs.added?.(accepted.id);
  } catch (error) { showError(error); }
}

async function submitBatch(event) {
  event.preventDefault();
  showError(null);
  const file = $("batch-file").files[0];
  if (!file) return showError("choose a .jsonl or .csv file first");
  try {
    const format = file.name.toLowerCase().endsWith(".csv") ? "csv" : "jsonl";
    const batch = await farmApi.post("/v1/batches", {content: await file.text(), format,
                                                     name: file.name.slice(0, 128)});
    location.hash = `#/batch/${batch.id}`;
  } catch (error) { showError(error); }
}

// ---- which view: the hash names it; without a key, the sign-in form ----

const VIEWS = {jobs: startJobs, job: startJob, batch: startBatch, farm: startFarm};

function route() {
  stopView();
  stopView = () => {};
  showError(null);
  const signedIn = Boolean(farmApi.key());
  const [, name = "jobs", id] = location.hash.split("/");
  const view = signedIn && VIEWS[name] ? name : signedIn ? "jobs" : "sign-in";
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== `${view}-view`;
  }
  $("nav").hidden = !signedIn;
  if (signedIn) stopView = VIEWS[view](decodeURIComponent(id || ""));
}

async function signIn(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  $("key").value = "";  // not left in the form
  farmApi.signIn(key);
  try {
    await farmApi.json("/v1/jobs?limit=1");  // a wrong key is a 401 here
    route();
  } catch (error) {
    farmApi.signOut();
    route();
    showError(error);
  }
}

function signOut() {
  farmApi.signOut();
  location.hash = "";
  route();
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("submit").addEventListener("submit", submitJob);
  $("batch-form").addEventListener("submit", submitBatch);
  window.addEventListener("hashchange", route);
  window.addEventListener("farm-signed-out", route);
  route();
});
