// The farm's HTTP API as the web page uses it (issue #14, item 3).
// The key lives in this tab's sessionStorage (cleared when the tab closes, or on sign-out)
// and is sent only as an Authorization header: never in a URL, never in localStorage.
// EventSource cannot send headers, so event streams are read with fetch() and parsed here;
// videos and pictures are fetched with the header too and shown through object URLs.
"use strict";

const KEY_SLOT = "farm.key";

const farmApi = {
  key() { return sessionStorage.getItem(KEY_SLOT); },
  signIn(key) { sessionStorage.setItem(KEY_SLOT, key); },
  signOut() { sessionStorage.removeItem(KEY_SLOT); },

  // fetch with the key; a 401 signs out (revoked key), other errors throw the API's message.
  async request(path, options = {}) {
    const headers = Object.assign({}, options.headers, {Authorization: `Bearer ${farmApi.key()}`});
    const resp = await fetch(path, Object.assign({}, options, {headers, referrerPolicy: "no-referrer",
                                                               credentials: "omit"}));
    if (resp.status === 401) {
      farmApi.signOut();
      window.dispatchEvent(new Event("farm-signed-out"));
    }
    if (!resp.ok) throw new Error(await farmApi.message(resp));
    return resp;
  },

  async json(path, options) { return (await farmApi.request(path, options)).json(); },

  post(path, body) {
    return farmApi.json(path, {method: "POST", headers: {"Content-Type": "application/json"},
                               body: body === undefined ? undefined : JSON.stringify(body)});
  },

  // "409 job ... has already ended", or every field of a 422.
  async message(resp) {
    let detail = resp.statusText;
    try {
      detail = (await resp.json()).detail;
    } catch (_) { /* not JSON */ }
    if (Array.isArray(detail)) detail = detail.map((d) => d.message || JSON.stringify(d)).join("; ");
    else if (typeof detail !== "string") detail = JSON.stringify(detail);
    return `${resp.status}: ${detail}`;
  },

  // An object URL of a picture or video fetched with the key. A video on S3 storage comes
  // as a presigned URL instead (?redirect=false), which carries a signature, not the key.
  async mediaUrl(path) {
    const resp = await farmApi.request(path);
    if ((resp.headers.get("content-type") || "").startsWith("application/json")) {
      return {url: (await resp.json()).url, revoke() {}};
    }
    const url = URL.createObjectURL(await resp.blob());
    return {url, revoke() { URL.revokeObjectURL(url); }};
  },

  // Reads a text/event-stream until it ends or `signal` aborts; onEvent(type, data).
  async stream(path, onEvent, signal) {
    const resp = await farmApi.request(path, {signal, headers: {Accept: "text/event-stream"}});
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseEvent(block);
        if (event) onEvent(event.type, event.data);
      }
    }
  },
};

// One event of a text/event-stream block: "event:" and "data:" lines; ":" lines are pings.
function parseEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try {
    return {type, data: JSON.parse(data.join("\n"))};
  } catch (_) {
    return {type, data: data.join("\n")};
  }
}
