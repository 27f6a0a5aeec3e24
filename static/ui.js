// Small DOM helpers shared by the views.

/** `el('div.card', {onclick}, child, ...)`: an element with classes, attributes and children. */
export function el(tag, attrs = {}, ...children) {
  const [name, ...classes] = tag.split('.');
  const node = document.createElement(name);
  if (classes.length) node.className = classes.join(' ');
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'text') node.textContent = v;
    else if (k === 'style' && typeof v === 'object') Object.assign(node.style, v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** Shows a message at the top of the page; errors stay until dismissed. */
export function notice(message, kind = 'error') {
  const box = document.getElementById('notice');
  box.replaceChildren(el('span', { text: message }), el('button.link', { onclick: () => { box.hidden = true; }, 'aria-label': 'dismiss' }, '×'));
  box.className = kind;
  box.hidden = false;
  if (kind !== 'error') setTimeout(() => { box.hidden = true; }, 4000);
}

export const pct = (x, digits = 1) => (x === null || x === undefined ? '–' : `${(x * 100).toFixed(digits)}%`);

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return '–';
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : '–';
}

export const short = (id) => (id ? id.slice(0, 8) : '–');

/** A status pill. */
export const badge = (status) => el(`span.badge.${status}`, { text: status });

/** Probability bars for one prediction. */
export function probabilityBars(probabilities) {
  const rows = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  return el('div.bars', {}, rows.map(([label, p]) => el('div.bar-row', {},
    el('span.bar-label', { text: label }),
    el('span.bar-track', {}, el('span.bar-fill', { style: { width: `${(p * 100).toFixed(1)}%` } })),
    el('span.bar-value', { text: pct(p) }))));
}

/** A drop zone that also opens a file picker; calls `onFiles(FileList)`. */
export function dropZone(label, accept, multiple, onFiles) {
  const input = el('input', { type: 'file', accept, multiple, hidden: true, onchange: () => input.files.length && onFiles(input.files) });
  const zone = el('div.drop', { tabindex: 0, role: 'button', onclick: () => input.click(),
    onkeydown: (e) => (e.key === 'Enter' || e.key === ' ') && input.click(),
    ondragover: (e) => { e.preventDefault(); zone.classList.add('over'); },
    ondragleave: () => zone.classList.remove('over'),
    ondrop: (e) => { e.preventDefault(); zone.classList.remove('over'); if (e.dataTransfer.files.length) onFiles(e.dataTransfer.files); } },
  el('p', { text: label }), input);
  return zone;
}
