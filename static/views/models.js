// Models and predict: the models with the default marked, promotion, and a drop zone that
// shows each image with its probability bars.
import { api, apiAll, upload } from '../api.js';
import { el, notice, dropZone, pct, probabilityBars, short, when, badge } from '../ui.js';

export async function modelsView(view) {
  const list = el('div');
  const results = el('div.predictions', { 'data-testid': 'predictions' });
  let models = [];
  const choice = el('select', { id: 'f-model', 'aria-label': 'model' });

  async function refresh() {
    models = await apiAll('/api/models');
    if (!models.length) {
      list.replaceChildren(el('p', {}, 'No model yet: a model appears when a run succeeds. ', el('a', { href: '#/train', text: 'Train one' })));
      choice.replaceChildren();
      return;
    }
    list.replaceChildren(el('table.list', { 'data-testid': 'models' },
      el('thead', {}, el('tr', {}, ['model', 'classes', 'val. accuracy', 'created', ''].map((h) => el('th', { text: h })))),
      el('tbody', {}, models.map((m) => el('tr', {},
        el('td', {}, el('a', { href: `#/runs/${m.run_id}`, text: short(m.id) }), m.is_default ? [' ', badge('default')] : null),
        el('td', { text: m.classes.join(', ') }),
        el('td', { text: pct(m.val_accuracy, 2) }),
        el('td', { text: when(m.created_at) }),
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
    try {
      const answer = await upload(`/api/predict?model=${encodeURIComponent(choice.value)}`, form, () => {});
      results.replaceChildren(...answer.predictions.map((p, i) => el('figure.prediction', {},
        el('img', { src: URL.createObjectURL(images[i]), alt: p.filename ?? '' }),
        el('figcaption', {}, el('b', { text: `${p.label} ${pct(p.confidence)}` }), el('br'), el('small', { text: p.filename ?? '' }), probabilityBars(p.probabilities)))));
    } catch (e) {
      notice(`Prediction refused: ${e.message}`);
    }
  }

  view.append(el('h2', { text: 'Models' }), list,
    el('h2', { text: 'Predict' }), el('div.field', {}, el('label', { for: 'f-model', text: 'Model' }), choice),
    dropZone('Drop one or more photos here, or click to choose', 'image/*', true, predict), results);
  await refresh();
}
