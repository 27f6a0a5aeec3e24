// The public REST API and its SSE stream, and nothing else: this page doubles as an example.

const KEY = 'transferd.api-key';

/** An error answered by the API: `message` for people, `field` when a field is at fault. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `request failed with status ${status}`);
    this.status = status;
    this.code = e.code;
    this.field = e.field;
  }
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** Asks once for an API key and keeps it for the session. */
async function askForKey() {
  const dialog = document.getElementById('key-dialog');
  const input = document.getElementById('key-input');
  input.value = '';
  dialog.showModal();
  const answer = await new Promise((resolve) => dialog.addEventListener('close', () => resolve(dialog.returnValue), { once: true }));
  if (answer === 'ok' && input.value.trim()) {
    sessionStorage.setItem(KEY, input.value.trim());
    return true;
  }
  return false;
}

async function parse(res) {
  if (res.status === 204) return null;
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

/** `fetch` with the key; retries once after asking for a key on 401. */
async function send(path, { method = 'GET', json, body } = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = { method, headers: headers(json !== undefined ? { 'Content-Type': 'application/json' } : {}) };
    if (json !== undefined) init.body = JSON.stringify(json);
    else if (body !== undefined) init.body = body;
    const res = await fetch(path, init);
    if (res.status === 401 && attempt === 0 && (await askForKey())) continue;
    return res;
  }
}

/** `fetch` with the key, JSON in and out. */
export async function api(path, options = {}) {
  return parse(await send(path, options));
}

/** Every row of a paged list (`/api/datasets`, `/api/runs`, `/api/models`), newest first,
 *  following `X-Next-Cursor` a thousand rows at a time. */
export async function apiAll(path) {
  const rows = [];
  let cursor = null;
  do {
    const sep = path.includes('?') ? '&' : '?';
    const res = await send(`${path}${sep}limit=1000${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
    rows.push(...(await parse(res)));
    cursor = res.headers.get('X-Next-Cursor');
  } while (cursor);
  return rows;
}

/** Uploads with progress (fetch cannot report upload progress; XHR can). */
export function upload(path, form, onProgress) {
  const send = () => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, { error: { message: 'the upload could not reach the server' } }));
    xhr.send(form);
  });
  return send().catch(async (e) => {
    if (e.status === 401 && (await askForKey())) return send();
    throw e;
  });
}

/**
 * Follows `/api/runs/{id}/events` (Server-Sent Events read through fetch, so the API key
 * travels in a header). Calls `onEvent(name, data)`; resolves when the stream ends.
 */
export async function follow(id, onEvent, signal) {
  const res = await fetch(`/api/runs/${id}/events`, { headers: headers(), signal });
  if (!res.ok) return parse(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = 'message';
      let data = '';
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data += line.slice(5).trimStart();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

/** An object URL for an image the API serves (fetched with the key, for protected reads). */
export async function imageUrl(path) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw new ApiError(res.status, null);
  return URL.createObjectURL(await res.blob());
}

/** The file name of the API's `Content-Disposition: attachment; filename="…"`. */
function attachmentName(disposition) {
  return disposition?.match(/filename="([^"]+)"/)?.[1] ?? null;
}

/** A download the API serves (fetched with the key): `{ blob, filename }`, the name from
 *  `Content-Disposition` (null when it gives none). */
export async function download(path) {
  const res = await send(path);
  if (!res.ok) return parse(res);
  return { blob: await res.blob(), filename: attachmentName(res.headers.get('Content-Disposition')) };
}
