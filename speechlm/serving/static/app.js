// SpeechLM web page: send an uploaded or recorded clip to /v1/audio/transcriptions and show the result; questions
// about the same clip go to /v1/chat/completions (streamed). Everything the server says is shown as text.
"use strict";

const $ = (id) => document.getElementById(id);
const statusLine = $("status");
const transcript = $("transcript");
let lastAudio = null; // {blob, name}: "Transcribe again" and "Ask" resend it
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
  $("ask").disabled = false;
  const player = $("player");
  player.src = URL.createObjectURL(blob);
  player.hidden = false;

  const format = $("format").value;
  const form = new FormData();
  form.append("file", blob, name);
  form.append("model", "speechlm");
  form.append("response_format", format);
  if ($("prompt").value.trim()) form.append("prompt", $("prompt").value.trim());
  if ($("instructions").value.trim()) form.append("instructions", $("instructions").value.trim());
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

// ---------------------------------------------------------------------------------------- ask about this audio
function base64Of(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function audioFormat(name) {
  const extension = (name.split(".").pop() || "").toLowerCase();
  return ["wav", "mp3", "ogg", "flac", "webm", "m4a", "opus", "mp4"].includes(extension) ? extension : "wav";
}

// Reads OpenAI's chat.completion.chunk events and appends each text delta to `out`.
async function readChatStream(response, out) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
      }
    }
  }
}

async function ask(question) {
  if (!lastAudio || !question) return;
  const { blob, name } = lastAudio;
  const answer = $("answer");
  $("asked").textContent = `Q: ${question}`;
  answer.textContent = "";
  setStatus(`Asking about ${name}`, "busy");
  const started = performance.now();
  try {
    const audio = { data: await base64Of(blob), format: audioFormat(name) };
    const body = {
      model: "speechlm",
      stream: true,
      messages: [
        { role: "user", content: [{ type: "input_audio", input_audio: audio }, { type: "text", text: question }] },
      ],
    };
    const schema = $("schema").value.trim();
    if (schema) {
      let parsed;
      try {
        parsed = JSON.parse(schema);
      } catch (error) {
        setStatus(`Error: the JSON schema is not valid JSON (${error.message})`, "error");
        return;
      }
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: parsed } };
    }
    const headers = { "Content-Type": "application/json" };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    const response = await fetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), headers });
    if (!response.ok) {
      const isJson = (response.headers.get("content-type") || "").includes("application/json");
      const error = isJson ? await response.json() : null;
      setStatus(`Error: ${error && error.error ? error.error.message : `HTTP ${response.status}`}`, "error");
      return;
    }
    await readChatStream(response, answer);
    setStatus(`Answered about ${name} in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (error) {
    setStatus(`Error: ${error.message}`, "error");
  }
}

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  ask($("question").value.trim());
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
