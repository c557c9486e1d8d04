// The Chorus web page: submit prompts, watch the queue, play the results and see what each reused.
// Plain JavaScript over the same OpenAI-shaped API the Python client uses.
"use strict";

const $ = (id) => document.getElementById(id);
const cards = new Map(); // video id -> its <li>, kept across polls so playing videos are not reset

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const message = body?.error?.message || `${response.status} ${response.statusText}`;
    throw new Error(response.status === 429 ? `Busy: ${message}` : message);
  }
  return body;
}

async function loadInfo() {
  const info = await api("/v1/chorus/info");
  $("server-info").textContent =
    `model ${info.model} (${info.family}, ${info.device}, ${info.dtype}) · ${info.fps} fps · ` +
    `up to ${info.max_seconds}s · queue ${info.queue.queued}/${info.max_queue}`;
  if (!$("size").value) $("size").value = info.default_size;
  if (!$("seconds").value) $("seconds").value = info.default_seconds;
  if (!$("steps").value) $("steps").value = info.default_steps;
  if (!$("guidance").value) $("guidance").value = info.default_guidance_scale;
  document.body.dataset.ready = "true";
}

async function submit(event) {
  event.preventDefault();
  const error = $("form-error");
  error.hidden = true;
  const body = { prompt: $("prompt").value, size: $("size").value.trim(), seconds: $("seconds").value.trim() };
  const numbers = { steps: "steps", seed: "seed", guidance_scale: "guidance" };
  for (const [field, id] of Object.entries(numbers)) {
    if ($(id).value !== "") body[field] = Number($(id).value);
  }
  body.cache_policy = $("cache_policy").value;
  $("submit").disabled = true;
  try {
    const video = await api("/v1/videos", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    render(video);
    schedulePoll(200);
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    $("submit").disabled = false;
  }
}

function reuseText(video) {
  const report = video.chorus?.report;
  if (!report) return ["", ""];
  const saved = report.seconds_saved_estimate ? `, about ${report.seconds_saved_estimate.toFixed(2)} s saved` : "";
  const where = { local: ", read from this replica's memory", shared: ", fetched from the shared store" };
  const source = `“${report.source_prompt}” (${report.source_id}${where[report.source_tier] || ""})`;
  switch (report.outcome) {
    case "exact":
      return ["exact", `Exact repeat of ${source}: all ${report.num_steps} steps reused, nothing denoised`];
    case "hit": {
      const region = report.difference === "local"
        ? `recomputed only the ${(100 * report.mask_fraction).toFixed(0)}% of the video that differs`
        : "nothing differed after the first step";
      return ["hit", `Reused ${source}, similarity ${report.similarity.toFixed(3)}: ${region} ` +
        `(plan ${report.plan}), ${report.steps_saved.toFixed(1)} of ${report.num_steps} steps' work saved${saved}`];
    }
    case "miss": {
      const nearest = report.similarity != null ? ` (nearest similarity ${report.similarity.toFixed(3)})` : "";
      const why = report.difference === "global" ? ": most of the video differs from every cached one"
        : report.miss_reason ? `: ${report.miss_reason}` : "";
      return ["miss", `No cached request reused${nearest}${why}; ${report.steps_computed} steps computed`];
    }
    default:
      return ["off", "Cache off: computed in full"];
  }
}

function card(video) {
  let li = cards.get(video.id);
  if (li) return li;
  li = document.createElement("li");
  li.className = "job";
  li.dataset.id = video.id;
  li.innerHTML = `
    <div class="media"><span class="muted placeholder">waiting</span></div>
    <div class="details">
      <p class="prompt"></p>
      <div class="meta"><span class="status"></span> <span class="info"></span></div>
      <progress max="100" value="0"></progress>
      <div class="reuse"></div>
      <div class="error"></div>
      <div class="actions"><button type="button" class="secondary delete">Delete</button></div>
    </div>`;
  li.querySelector(".prompt").textContent = video.prompt;
  li.querySelector(".delete").addEventListener("click", async () => {
    try {
      await api(`/v1/videos/${video.id}`, { method: "DELETE" });
      li.remove();
      cards.delete(video.id);
    } catch (err) {
      li.querySelector(".error").textContent = err.message;
    }
  });
  cards.set(video.id, li);
  $("jobs").prepend(li);
  return li;
}

function render(video) {
  const li = card(video);
  li.dataset.status = video.status;
  const status = li.querySelector(".status");
  status.textContent = video.status.replace("_", " ");
  status.className = `status ${video.status}`;
  const c = video.chorus || {};
  li.querySelector(".info").textContent =
    `${video.size} · ${video.seconds}s (${c.num_frames} frames) · ${c.steps} steps · seed ${c.seed} · cache ${c.cache_policy}` +
    (c.replica ? ` · replica ${c.replica}` : "");
  const progress = li.querySelector("progress");
  progress.value = video.progress;
  progress.hidden = video.status === "completed" || video.status === "failed";
  li.querySelector(".error").textContent = video.error ? `Failed: ${video.error.message}` : "";
  const [kind, text] = reuseText(video);
  const reuse = li.querySelector(".reuse");
  reuse.className = `reuse ${kind}`;
  reuse.textContent = text;
  if (video.status === "completed" && !li.querySelector("video")) {
    const media = li.querySelector(".media");
    media.innerHTML = "";
    const player = document.createElement("video");
    Object.assign(player, { controls: true, muted: true, loop: true, autoplay: true, playsInline: true });
    player.src = `/v1/videos/${video.id}/content`;
    media.appendChild(player);
    const link = document.createElement("a");
    link.href = player.src;
    link.download = `${video.id}.mp4`;
    link.textContent = "Download MP4";
    li.querySelector(".actions").appendChild(link);
  }
  $("empty").hidden = cards.size > 0;
}

async function poll() {
  try {
    const page = await api("/v1/videos?limit=50");
    const seen = new Set();
    for (const video of page.data.slice().reverse()) {
      render(video);
      seen.add(video.id);
    }
    for (const [id, li] of cards) {
      if (!seen.has(id) && li.dataset.status !== "completed") {
        li.remove(); // deleted elsewhere
        cards.delete(id);
      }
    }
    document.body.dataset.polled = String(Number(document.body.dataset.polled || 0) + 1);
  } catch (err) {
    $("server-info").textContent = `server unreachable: ${err.message}`;
  }
  const busy = [...cards.values()].some((li) => li.dataset.status === "queued" || li.dataset.status === "in_progress");
  schedulePoll(busy ? 500 : 2000);
}

let pollTimer = null;
function schedulePoll(ms) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, ms);
}

$("create-form").addEventListener("submit", submit);
loadInfo().catch((err) => { $("server-info").textContent = `server unreachable: ${err.message}`; });
poll();
