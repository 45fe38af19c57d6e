// The job, batch and farm views of the web page (issue #14, item 3); app.js chooses them.
"use strict";

function startJob(id) {
  const streamAbort = new AbortController();
  let video = null;  // the object URL (or presigned URL) playing
  $("job-id").textContent = id;
  $("video").hidden = true;
  $("video").removeAttribute("src");

  async function load() {
    const job = await farmApi.json(`/v1/jobs/${id}`);
    showJobState(job.state, job.progress, job.queue_position, job.eta_s);
    $("job-error").textContent = job.error || "";
    $("job-error").hidden = !job.error;
    $("job-facts").replaceChildren(...facts(job));
    $("job-route").textContent = JSON.stringify(job.route, null, 2);
    const log = await farmApi.json(`/v1/jobs/${id}/events`);
    $("job-events").querySelector("tbody").replaceChildren(...log.map((e) => el("tr", {},
      el("td", {}, new Date(e.created_at).toLocaleTimeString()), el("td", {}, e.kind),
      el("td", {}, e.segment_index ?? ""), el("td", {}, e.worker ?? ""), el("td", {}, e.message))));
    if (job.state === "succeeded" && !video) await play();
    return job;
  }

  async function play() {
    video = await farmApi.mediaUrl(`/v1/jobs/${id}/video?redirect=false`);
    const player = $("video");
    player.src = video.url;
    player.hidden = false;
    player.play().catch(() => {});  // muted, so allowed; the controls are there otherwise
  }

  function watch() {  // the stream updates the header; its end reloads the whole page's data
    farmApi.stream(`/v1/jobs/${id}/stream`, (type, data) => {
      if (type === "state") showJobState(data.state);
      else if (type === "progress") showJobState(null, data.job_progress);
      else if (type === "queue") $("job-queue").textContent = queueText(data.queue_position, data.eta_s);
    }, streamAbort.signal).then(load).catch((error) => {
      if (error.name !== "AbortError") showError(error);
    });
  }

  async function control(verb) {
    showError(null);
    try {
      await farmApi.post(`/v1/jobs/${id}/${verb}`);
      const job = await load();
      if (!FINAL.has(job.state)) watch();
    } catch (error) { showError(error); }
  }

  $("cancel").onclick = () => control("cancel");
  $("retry").onclick = () => control("retry");
  load().then((job) => { if (!FINAL.has(job.state)) watch(); }).catch(showError);
  return () => {
    streamAbort.abort();
    $("video").pause();
    $("video").removeAttribute("src");
    video?.revoke();
  };
}

function showJobState(state, progress, position, eta) {
  if (state) {
    $("job-state").textContent = state;
    $("job-state").dataset.state = state;
    $("cancel").disabled = FINAL.has(state);
    $("retry").disabled = !["failed", "canceled", "expired"].includes(state);
    if (FINAL.has(state)) $("job-queue").textContent = "";
  }
  if (progress != null) $("job-progress").value = progress;
  if (position !== undefined) $("job-queue").textContent = queueText(position, eta);
}

function facts(job) {
  const shown = {prompt: job.prompt, model: job.model, track: job.track,
                 size: `${job.width}x${job.height}`, frames: job.frames, fps: job.fps,
                 steps: job.steps, seed: job.seed, priority: job.priority,
                 batch: job.batch_id || "", cached: job.cached ? `from ${job.cached_from}` : "no",
                 queued: job.queued_seconds != null ? `${job.queued_seconds.toFixed(1)} s` : "",
                 rendered: job.run_seconds != null ? `${job.run_seconds.toFixed(1)} s` : ""};
  return Object.entries(shown).flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]);
}

function startBatch(id) {
  const streamAbort = new AbortController();
  const pictures = [];
  const states = new Map();  // job id -> its row's state cell
  $("batch-id").textContent = id;
  $("batch-report").replaceChildren(el("p", {class: "note"}, "The report appears when every job has ended."));

  function showCounts(counts) {
    $("batch-counts").textContent = Object.entries(counts).map(([s, n]) => `${s}: ${n}`).join(", ");
  }

  async function load() {
    const batch = await farmApi.json(`/v1/batches/${id}`);
    $("batch-state").textContent = batch.state;
    showCounts(batch.counts);
    const rows = batch.job_ids.map((jobId) => {
      states.set(jobId, el("td", {class: "state"}, ""));
      return el("tr", {}, el("td", {}, el("a", {href: `#/job/${jobId}`}, jobId)), states.get(jobId));
    });
    $("batch-jobs").querySelector("tbody").replaceChildren(...rows);
    for (const jobId of batch.job_ids.slice(0, 25)) {  // the first rows' states; then the stream's
      farmApi.json(`/v1/jobs/${jobId}`).then((job) => { states.get(jobId).textContent = job.state; })
        .catch(() => {});
    }
    if (batch.report_urls.html) await showReport(batch.report_urls.html);
    return batch;
  }

  async function showReport(url) {  // the server's report, its pictures fetched with the key
    const html = await (await farmApi.request(new URL(url).pathname)).text();
    const parsed = new DOMParser().parseFromString(html, "text/html").querySelector("table");
    if (!parsed) return;
    parsed.querySelectorAll("script, [href^='javascript:']").forEach((n) => n.remove());
    for (const link of parsed.querySelectorAll("a")) link.replaceWith(...link.childNodes);
    const sources = [...parsed.querySelectorAll("img")].map((img) => {
      const path = new URL(img.getAttribute("src"), url).pathname;  // ../../jobs/ID/...
      img.removeAttribute("src");  // not fetched without the key
      return path;
    });
    const table = document.importNode(parsed, true);  // this document's: its images load
    table.querySelectorAll("img").forEach((img, i) => farmApi.mediaUrl(sources[i])
      .then((p) => { pictures.push(p); img.src = p.url; }).catch(() => {}));
    $("batch-report").replaceChildren(table);
  }


  load().then((batch) => {
    if (batch.state === "done") return;
    return farmApi.stream(`/v1/batches/${id}/stream`, (type, data) => {
      if (type === "counts") showCounts(data.counts);
      else if (type === "job" && states.has(data.id)) states.get(data.id).textContent = data.state;
    }, streamAbort.signal).then(load);
  }).catch((error) => { if (error.name !== "AbortError") showError(error); });
  return () => {
    streamAbort.abort();
    pictures.forEach((p) => p.revoke());
  };
}

function startFarm() {
  async function load() {
    try {
      const farm = await farmApi.json("/v1/farm");
      $("farm").querySelector("tbody").replaceChildren(...farm.tiers.map((t) => el("tr",
        {"data-tier": t.tier}, ...[t.tier, t.gpu ?? "", t.gpus, t.groups_busy, t.groups_idle,
                                   t.jobs_waiting, t.jobs_admitted, t.jobs_running]
          .map((v) => el("td", {}, v)))));
    } catch (error) { showError(error); }
  }
  load();
  const timer = setInterval(load, FARM_REFRESH_MS);
  return () => clearInterval(timer);
}
