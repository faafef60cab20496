// A realtime voice session from a browser (docs/realtime.md): microphone -> PCM16 over a WebSocket,
// the agent's PCM16 24 kHz played back gaplessly, cut at barge-in, with playout acknowledgements.
// Plain JS, no build step. URL parameters: see index.html and README.md.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const WORKFLOW = params.get("workflow") || "voice-agent";
  const API = (params.get("api") || "").replace(/\/+$/, "");
  const KEY = params.get("key") || "";
  const TOKEN_URL = params.get("token_url") || "";
  const OUT_RATE = 24000; // the agent's audio: raw PCM16 mono at 24 kHz
  const ACK_EVERY_MS = 200; // playout acknowledgements while an answer plays
  const LEAD_S = 0.05; // an answer's first chunk starts this far ahead, so the next can arrive in time

  // Machine-readable state, for people (the <pre> below) and tests (window.casolaRealtime).
  const status = (window.casolaRealtime = {
    connected: false, state: "idle", workflow: WORKFLOW, inputRate: 0, events: [], audioBytes: 0,
    audioSent: 0, acks: 0, acked: {}, bargeIns: [], responses: [], transcripts: [], timing: [], errors: [],
    closed: null,
  });

  const $ = (id) => document.getElementById(id);
  let ws = null, ctx = null, mic = null, ackTimer = 0, interrupt = true;
  let playing = null; // the answer being played: {id, sources: [{node, start, dur}], acked}
  let nextTime = 0; // where the next chunk is scheduled, in ctx.currentTime's clock
  const agentLines = new Map(); // response id -> its transcript entry

  // -- the microphone: Float32 -> PCM16 in ~20 ms messages, off the main thread --------------------
  const WORKLET = `
    class Pcm16 extends AudioWorkletProcessor {
      constructor() { super(); this.size = Math.round(sampleRate / 50); this.buf = new Int16Array(this.size); this.n = 0; }
      process(inputs) {
        const ch = inputs[0][0]; // 128 frames, mono (the node downmixes)
        if (ch) for (let i = 0; i < ch.length; i++) {
          const s = Math.max(-1, Math.min(1, ch[i]));
          this.buf[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
          if (this.n === this.size) { // transfer, not copy, then start a new buffer
            this.port.postMessage(this.buf.buffer, [this.buf.buffer]);
            this.buf = new Int16Array(this.size); this.n = 0;
          }
        }
        return true;
      }
    }
    registerProcessor("pcm16", Pcm16);`;

  async function startCapture() {
    const url = URL.createObjectURL(new Blob([WORKLET], { type: "application/javascript" }));
    await ctx.audioWorklet.addModule(url); // once per AudioContext: each connect makes a new one
    URL.revokeObjectURL(url);
    // No outputs: the node is pulled by its input alone, and nothing of the mic reaches the speakers.
    const node = new AudioWorkletNode(ctx, "pcm16", {
      numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
    });
    node.port.onmessage = (m) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      ws.send(m.data);
      status.audioSent += m.data.byteLength;
    };
    ctx.createMediaStreamSource(mic).connect(node);
  }

  // -- the session token: from your backend, or minted here with a key (local development only) ----
  async function sessionUrl() {
    const body = JSON.stringify({ model: WORKFLOW });
    let r;
    if (TOKEN_URL) {
      r = await fetch(TOKEN_URL, { method: "POST", headers: { "Content-Type": "application/json" }, body });
    } else if (API && KEY) {
      r = await fetch(API + "/v1/realtime/sessions", {
        method: "POST", headers: { Authorization: "Bearer " + KEY, "Content-Type": "application/json" }, body,
      });
    } else {
      throw new Error("configure the page: ?token_url=... or ?api=http://127.0.0.1:8000&key=...");
    }
    if (!r.ok) throw new Error(`session token: HTTP ${r.status} ${await r.text()}`);
    const s = await r.json();
    if (s.url) return s.url; // ws://<the host it was asked>/v1/realtime?token=...&model=...
    const base = (API || location.origin).replace(/^http/, "ws");
    return `${base}/v1/realtime?token=${encodeURIComponent(s.token)}&workflow=${encodeURIComponent(WORKFLOW)}`;
  }

  // -- connect / hang up ----------------------------------------------------------------------------
  async function connect() {
    if (ctx) return;
    $("connect").disabled = true; // until connected or failed
    $("connect").textContent = "Hang up";
    status.closed = null;
    setState("connecting");
    try {
      // Created in the click's handler: browsers start audio only after a user gesture.
      ctx = new AudioContext();
      ctx.resume(); // not awaited: without a gesture (autostart) it waits for one
      mic = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      const url = await sessionUrl(); // after the permission prompt: a token lives ~60 s
      ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      ws.onmessage = (m) => (typeof m.data === "string" ? onEvent(JSON.parse(m.data)) : onAudio(m.data));
      ws.onclose = (e) => { status.closed = { code: e.code, reason: e.reason }; hangup(); };
      await new Promise((ok, fail) => {
        ws.onopen = ok;
        ws.onerror = () => fail(new Error("the WebSocket did not open (see the browser console)"));
      });
      status.connected = true;
      status.inputRate = Math.round(ctx.sampleRate);
      // First message: the input format (a browser cannot set X-Casola-Param-rate on a WebSocket).
      ws.send(JSON.stringify({ type: "session.update", session: { input_audio: { format: "pcm16", rate: status.inputRate } } }));
      await startCapture();
      ackTimer = setInterval(ack, ACK_EVERY_MS);
      setState(ctx.state === "running" ? "listening" : "audio is blocked until you click the page");
    } catch (e) {
      fault({ message: String(e.message || e) });
      hangup();
    }
    $("connect").disabled = false;
  }

  function hangup() {
    clearInterval(ackTimer);
    if (ws) { ws.onclose = null; ws.close(1000); ws = null; }
    stopPlayback();
    if (mic) mic.getTracks().forEach((t) => t.stop());
    if (ctx) ctx.close();
    mic = ctx = null;
    status.connected = false;
    $("connect").textContent = "Connect";
    setState(status.closed ? `closed (${status.closed.code} ${status.closed.reason})` : "not connected");
  }

  // -- the agent's audio ------------------------------------------------------------------------------
  function onAudio(buf) {
    status.audioBytes += buf.byteLength;
    if (!playing || !ctx || buf.byteLength < 2) return; // cut at a barge-in: nothing more of it should come
    const pcm = new Int16Array(buf, 0, buf.byteLength >> 1);
    const b = ctx.createBuffer(1, pcm.length, OUT_RATE); // the context resamples to its own rate
    const f = b.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    const node = ctx.createBufferSource();
    node.buffer = b;
    node.connect(ctx.destination);
    // Back to back with the previous chunk; after an underrun, a little ahead of now.
    const start = Math.max(nextTime, ctx.currentTime + LEAD_S);
    node.start(start);
    nextTime = start + b.duration;
    playing.sources.push({ node, start, dur: b.duration });
    render();
  }

  // Milliseconds of this answer the listener has heard: its chunks' spans up to now (gaps excluded).
  function playedMs(p) {
    const now = ctx.currentTime - (ctx.outputLatency || 0);
    let s = 0;
    for (const c of p.sources) s += Math.min(Math.max(now - c.start, 0), c.dur);
    return Math.round(s * 1000);
  }

  // Tells the session how much was played: the agent's item keeps what the user heard at a barge-in.
  function ack() {
    const p = playing;
    if (!p || !p.sources.length || !ctx || !ws || ws.readyState !== WebSocket.OPEN) return;
    const ms = playedMs(p);
    if (ms === p.acked) return; // nothing new played: quiet while idle
    p.acked = ms;
    ws.send(JSON.stringify({ type: "playout", response: p.id, played_ms: ms }));
    status.acks++;
    status.acked[p.id] = ms;
  }

  // The user spoke over the answer: the server has stopped it; stop what is scheduled of it here too.
  function bargeIn() {
    ack(); // what was heard, before it stops
    const cut = { response: playing.id, played_ms: playedMs(playing) };
    const line = agentLines.get(playing.id);
    if (line) line.interrupted = cut.played_ms;
    status.bargeIns.push(cut);
    stopPlayback();
  }

  function stopPlayback() {
    if (playing) for (const c of playing.sources) { try { c.node.stop(); } catch (_) { /* not started */ } }
    playing = null;
    nextTime = 0;
  }

  // -- events -------------------------------------------------------------------------------------------
  function onEvent(ev) {
    status.events.push(ev.type);
    switch (ev.type) {
      case "session.ready":
      case "session.updated":
        interrupt = !ev.session || !ev.session.turn_detection || ev.session.turn_detection.interrupt !== false;
        status.session = ev.session;
        break;
      case "speech_started":
        if (interrupt && playing && ctx && ctx.currentTime < nextTime) bargeIn();
        setState("hearing you");
        break;
      case "speech_stopped":
        setState("thinking");
        break;
      case "transcript":
        addLine(ev.role || "user", ev.text, ev.item);
        break;
      case "transcript.failed":
        fault({ message: `transcription failed: ${ev.message}` });
        break;
      case "response.started":
        playing = { id: ev.response, sources: [], acked: -1 };
        agentLines.set(ev.response, addLine("assistant", "", ev.response));
        setState("answering");
        break;
      case "response.text": {
        const line = agentLines.get(ev.response);
        if (line) line.text += (line.text ? " " : "") + ev.text;
        break;
      }
      case "response.done": {
        const line = agentLines.get(ev.response);
        if (line) { line.text = ev.text || line.text; line.status = ev.status; }
        status.responses.push({ id: ev.response, status: ev.status, reason: ev.reason || null,
          audio_ms: ev.audio_ms, text: ev.text, error: ev.error || null });
        if (ev.error) fault(ev.error);
        setState("listening");
        break;
      }
      case "turn.timing":
        status.timing.push(ev);
        break;
      case "error":
        fault(ev.error || { message: "error" });
        break;
    }
    render();
  }

  // -- the page -------------------------------------------------------------------------------------------
  function addLine(role, text, id) {
    const line = { role, text: text || "", id };
    status.transcripts.push(line);
    return line;
  }

  function fault(err) {
    status.errors.push(err);
    render();
  }

  function setState(s) {
    status.state = s;
    $("state").textContent = s;
    document.title = `casola realtime: ${s}`;
    render();
  }

  function timingText(t) {
    const ms = (k) => (typeof t[k] === "number" ? `${Math.round(t[k])} ms` : "-");
    const stages = Object.keys(t).filter((k) => k.endsWith("_ms") && !["voice_to_voice_ms", "platform_ms"].includes(k));
    return `${t.response}: voice to voice ${ms("voice_to_voice_ms")} (platform ${t.platform_ms ?? "-"} ms)` +
      (stages.length ? "  ·  stages (ms): " + stages.map((k) => `${k.slice(0, -3).replace(/_/g, " ")} ${t[k]}`).join(", ") : "") +
      (t.complete === false ? "  (incomplete)" : "");
  }

  let pending = false; // one repaint per task, however many events arrived
  function render() {
    if (pending) return;
    pending = true;
    setTimeout(() => {
      pending = false;
      const tr = $("transcript");
      tr.replaceChildren(...status.transcripts.map((l) => {
        const p = document.createElement("p");
        const cut = l.interrupted !== undefined ? `interrupted at ${(l.interrupted / 1000).toFixed(1)} s`
          : l.status && l.status !== "completed" ? l.status : "";
        p.className = l.role + (cut ? " interrupted" : "");
        const who = document.createElement("b");
        who.textContent = l.role === "user" ? "you: " : "agent: ";
        p.append(who, l.text + (cut ? ` [${cut}]` : ""));
        return p;
      }));
      $("timing").textContent = status.timing.map(timingText).join("\n");
      $("errors").textContent = status.errors.map((e) => e.message + (e.code ? ` (${e.code})` : "")).join("\n");
      $("status").textContent = JSON.stringify(status, null, 1);
    }, 0);
  }

  $("config").textContent = `workflow ${WORKFLOW}, ` + (TOKEN_URL ? `tokens from ${TOKEN_URL}`
    : API ? `tokens minted by this page at ${API}` + (KEY ? " (an API key in a page: local development only)" : "")
    : "not configured: add ?token_url=... or ?api=...&key=... to the URL");
  $("connect").onclick = () => (ctx ? hangup() : connect());
  document.addEventListener("click", () => ctx && ctx.resume()); // audio blocked at autostart: any click starts it
  if (params.get("autostart") === "1") connect();
  render();
})();
