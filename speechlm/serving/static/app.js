// SpeechLM web page: send an uploaded or recorded clip to /v1/audio/transcriptions and show the result.
"use strict";

const $ = (id) => document.getElementById(id);
const statusLine = $("status");
const transcript = $("transcript");
let lastAudio = null; // {blob, name}: "Transcribe again" resends it with the current options
let recorder = null;

function setStatus(text, kind = "") {
  statusLine.textContent = text;
  statusLine.className = kind;
}

function apiKey() {
  return $("api-key").value.trim();
}

function showResult(format, body) {
  if (format === "verbose_json") {
    const lines = body.segments.map((s) => `[${s.start.toFixed(2)} → ${s.end.toFixed(2)}] ${s.text}`);
    transcript.textContent = lines.length ? lines.join("\n") : body.text;
  } else if (format === "json") {
    transcript.textContent = body.text;
  } else {
    transcript.textContent = body;
  }
}

async function transcribe(blob, name) {
  lastAudio = { blob, name };
  $("again").disabled = false;
  const player = $("player");
  player.src = URL.createObjectURL(blob);
  player.hidden = false;

  const format = $("format").value;
  const form = new FormData();
  form.append("file", blob, name);
  form.append("model", "speechlm");
  form.append("response_format", format);
  if ($("prompt").value.trim()) form.append("prompt", $("prompt").value.trim());
  const headers = apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};

  setStatus(`Transcribing ${name}`, "busy");
  transcript.textContent = "";
  const started = performance.now();
  try {
    const response = await fetch("/v1/audio/transcriptions", { method: "POST", body: form, headers });
    const isJson = (response.headers.get("content-type") || "").includes("application/json");
    const body = isJson ? await response.json() : await response.text();
    if (!response.ok) {
      const message = isJson && body.error ? body.error.message : `HTTP ${response.status}`;
      setStatus(`Error: ${message}`, "error");
      return;
    }
    showResult(format, body);
    setStatus(`Done: ${name} in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (error) {
    setStatus(`Error: ${error.message}`, "error");
  }
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) transcribe(file, file.name);
});

$("again").addEventListener("click", () => {
  if (lastAudio) transcribe(lastAudio.blob, lastAudio.name);
});

function recordingType() {
  const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
  return types.find((type) => window.MediaRecorder && MediaRecorder.isTypeSupported(type)) || "";
}

$("record").addEventListener("click", async () => {
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    setStatus("Recording needs a browser with MediaRecorder, on https or localhost.", "error");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    setStatus(`Microphone unavailable: ${error.message}`, "error");
    return;
  }
  const type = recordingType();
  recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
  const parts = [];
  recorder.addEventListener("dataavailable", (event) => event.data.size && parts.push(event.data));
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((track) => track.stop());
    $("record").disabled = false;
    $("record").classList.remove("recording");
    $("stop").disabled = true;
    const mime = recorder.mimeType || type || "audio/webm";
    const extension = mime.includes("ogg") ? "ogg" : mime.includes("mp4") ? "m4a" : "webm";
    transcribe(new Blob(parts, { type: mime }), `recording.${extension}`);
  });
  recorder.start();
  $("record").disabled = true;
  $("record").classList.add("recording");
  $("stop").disabled = false;
  setStatus("Recording… press Stop when done.");
});

$("stop").addEventListener("click", () => {
  if (recorder && recorder.state !== "inactive") recorder.stop();
});

fetch("/health")
  .then((response) => response.json())
  .then((health) => {
    if (health.auth_required) {
      $("key-row").parentElement.open = true;
      setStatus("This server requires an API key (Options).");
    }
  })
  .catch(() => {});
