// Models and predict: the models with the default marked, promotion, export (ONNX,
// safetensors), and a drop zone that shows each image with its probability bars, or says it
// looks like none of the classes.
import { api, apiAll, upload, download } from '../api.js';
import { el, notice, dropZone, pct, probabilityBars, short, when, badge } from '../ui.js';

const EXPORTS = [['onnx', 'ONNX'], ['safetensors', 'safetensors']];
const num = (x) => (x === null || x === undefined ? '–' : Number(x).toPrecision(3));

/** Downloads a model's export through an object URL (the request may need the API key). */
async function saveExport(button, id, format) {
  button.disabled = true;
  try {
    const { blob, filename } = await download(`/api/models/${id}/export?format=${format}`);
    const url = URL.createObjectURL(blob);
    const a = el('a', { href: url, download: filename ?? `model-${id}.${format}`, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (e) {
    notice(`Export refused: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

/** One prediction: the label and its confidence, or "none of the classes"; then the bars. */
function predictionCard(p, file) {
  const unknown = p.unknown === true || p.label === null || p.label === undefined;
  const closest = p.top_k?.[0];
  const head = unknown
    ? [el('b.unknown', { 'data-testid': 'unknown', text: 'none of the classes' }),
      closest ? el('small.muted', { text: ` (closest: ${closest.label}, ${pct(closest.probability)})` }) : null]
    : el('b', { text: `${p.label} ${pct(p.confidence)}` });
  const ood = p.ood_score === null || p.ood_score === undefined ? null
    : el('small.muted', { 'data-testid': 'ood', text: `out-of-distribution score ${num(p.ood_score)} · threshold ${num(p.unknown_threshold)}` });
  return el(unknown ? 'figure.prediction.is-unknown' : 'figure.prediction', {},
    el('img', { src: URL.createObjectURL(file), alt: p.filename ?? '' }),
    el('figcaption', {}, head, el('br'), el('small', { text: p.filename ?? '' }), ood ? [el('br'), ood] : null,
      probabilityBars(p.probabilities)));
}

export async function modelsView(view) {
  const list = el('div');
  const results = el('div.predictions', { 'data-testid': 'predictions' });
  let models = [];
  const choice = el('select', { id: 'f-model', 'aria-label': 'model' });
  const threshold = el('input', { id: 'f-unknown-threshold', type: 'number', step: 'any', min: 0, placeholder: 'the model\'s own', 'data-testid': 'unknown-threshold' });

  async function refresh() {
    models = await apiAll('/api/models');
    if (!models.length) {
      list.replaceChildren(el('p', {}, 'No model yet: a model appears when a run succeeds. ', el('a', { href: '#/train', text: 'Train one' })));
      choice.replaceChildren();
      return;
    }
    list.replaceChildren(el('table.list', { 'data-testid': 'models' },
      el('thead', {}, el('tr', {}, ['model', 'classes', 'val. accuracy', 'created', 'download', ''].map((h) => el('th', { text: h })))),
      el('tbody', {}, models.map((m) => el('tr', {},
        el('td', {}, el('a', { href: `#/runs/${m.run_id}`, text: short(m.id) }), m.is_default ? [' ', badge('default')] : null),
        el('td', { text: m.classes.join(', ') }),
        el('td', { text: pct(m.val_accuracy, 2) }),
        el('td', { text: when(m.created_at) }),
        el('td', {}, EXPORTS.flatMap(([format, text]) => [el('button', { 'data-testid': `export-${format}`, title: `Download the model as ${text}`,
          onclick: (e) => saveExport(e.currentTarget, m.id, format) }, text), ' '])),
        el('td', {}, m.is_default ? '' : [
          el('button', { onclick: async () => {
            try { await api(`/api/models/${m.id}/promote`, { method: 'POST' }); notice(`Model ${short(m.id)} is now the default`, 'ok'); await refresh(); } catch (e) { notice(e.message); }
          } }, 'Make default'), ' ',
          el('button.danger', { onclick: async () => {
            if (!confirm(`Delete model ${short(m.id)}? Its run's record stays.`)) return;
            try { await api(`/api/models/${m.id}`, { method: 'DELETE' }); notice(`Model ${short(m.id)} deleted`, 'ok'); await refresh(); } catch (e) { notice(e.message); }
          } }, 'Delete')]))))));
    choice.replaceChildren(...models.map((m) => el('option', { value: m.id, selected: m.is_default, text: `${short(m.id)} – ${m.classes.join(', ')}${m.is_default ? ' (default)' : ''}` })));
  }

  async function predict(files) {
    const images = [...files].filter((f) => f.type.startsWith('image/') || /\.(jpe?g|png|webp|gif|bmp)$/i.test(f.name));
    if (!images.length) { notice('Drop image files (JPEG, PNG, WebP).'); return; }
    const form = new FormData();
    for (const f of images) form.append('image', f, f.name);
    let query = `model=${encodeURIComponent(choice.value)}`;
    if (threshold.value.trim() !== '') query += `&unknown_threshold=${encodeURIComponent(threshold.value.trim())}`;
    try {
      const answer = await upload(`/api/predict?${query}`, form, () => {});
      results.replaceChildren(...answer.predictions.map((p, i) => predictionCard(p, images[i])));
    } catch (e) {
      notice(`Prediction refused: ${e.message}`);
    }
  }

  view.append(el('h2', { text: 'Models' }), list,
    el('h2', { text: 'Predict' }),
    el('div.fields', {}, el('div.field', {}, el('label', { for: 'f-model', text: 'Model' }), choice),
      el('div.field', {}, el('label', { for: 'f-unknown-threshold', text: 'Unknown threshold (optional)' }), threshold,
        el('small.muted', { text: 'out-of-distribution score above which a photo is none of the classes; empty: the model\'s own' }))),
    dropZone('Drop one or more photos here, or click to choose', 'image/*', true, predict), results);
  await refresh();
}
