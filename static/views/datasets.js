// Datasets: upload a zip (drag and drop, with progress), read its report, list and delete.
import { api, apiAll, upload } from '../api.js';
import { barChart } from '../charts.js';
import { el, notice, dropZone, when, short } from '../ui.js';

export function report(dataset) {
  return el('section.card.report', { 'data-testid': 'dataset-report' },
    el('h3', {}, `${dataset.name} `, el('small', { text: `${dataset.total_images} images · ${dataset.classes.length} classes · ${short(dataset.id)}` })),
    barChart(dataset.classes.map((c) => c.name), dataset.classes.map((c) => c.count), 'images'),
    dataset.warnings.length ? el('ul.warnings', {}, dataset.warnings.map((w) => el('li', { text: w }))) : null,
    dataset.skipped.length
      ? el('details', {}, el('summary', { text: `${dataset.skipped.length} file(s) skipped` }),
        el('table', {}, el('thead', {}, el('tr', {}, el('th', { text: 'file' }), el('th', { text: 'reason' }))),
          el('tbody', {}, dataset.skipped.map((s) => el('tr', {}, el('td', { text: s.name }), el('td', { text: s.reason }))))))
      : el('p.muted', { text: 'No file was skipped.' }),
    el('a.button.primary', { href: `#/train?dataset=${dataset.id}` }, 'Train on this dataset'));
}

export async function datasetsView(view) {
  const progress = el('progress', { max: 1, value: 0, hidden: true });
  const result = el('div');
  const name = el('input', { placeholder: 'name (optional)', 'aria-label': 'dataset name' });
  const list = el('div');

  async function send(files) {
    const file = files[0];
    if (!file.name.toLowerCase().endsWith('.zip')) {
      notice(`${file.name} is not a .zip; upload a zip with one folder of images per class`);
      return;
    }
    const form = new FormData();
    if (name.value.trim()) form.append('name', name.value.trim());
    form.append('file', file);
    progress.hidden = false;
    progress.value = 0;
    try {
      const dataset = await upload('/api/datasets', form, (f) => { progress.value = f; });
      result.replaceChildren(report(dataset));
      notice(`Uploaded ${dataset.name}`, 'ok');
      await refresh();
    } catch (e) {
      notice(`Upload refused: ${e.message}`);
    } finally {
      progress.hidden = true;
    }
  }

  async function refresh() {
    const datasets = await apiAll('/api/datasets');
    if (!datasets.length) {
      list.replaceChildren(el('p.muted', { text: 'No dataset yet.' }));
      return;
    }
    list.replaceChildren(el('table.list', {},
      el('thead', {}, el('tr', {}, ['name', 'images', 'classes', 'uploaded', ''].map((h) => el('th', { text: h })))),
      el('tbody', {}, datasets.map((d) => el('tr', {},
        el('td', {}, el('button.link', { onclick: async () => { try { result.replaceChildren(report(await api(`/api/datasets/${d.id}`))); } catch (e) { notice(e.message); } } }, d.name)),
        el('td', { text: d.total_images }),
        el('td', { text: d.classes.map((c) => `${c.name} (${c.count})`).join(', ') }),
        el('td', { text: when(d.created_at) }),
        el('td', {}, el('a.button', { href: `#/train?dataset=${d.id}` }, 'Train'), ' ',
          el('button.danger', { onclick: async () => {
            if (!confirm(`Delete dataset ${d.name} and its images?`)) return;
            try { await api(`/api/datasets/${d.id}`, { method: 'DELETE' }); notice(`Deleted ${d.name}`, 'ok'); result.replaceChildren(); await refresh(); } catch (e) { notice(e.message); }
          } }, 'Delete')))))));
  }

  view.append(
    el('h2', { text: 'Datasets' }),
    el('p', { text: 'A zip with one folder of photos per class (cat/…, dog/…). A wrapping folder or train/ and val/ levels are fine.' }),
    name,
    dropZone('Drop a .zip here, or click to choose one', '.zip,application/zip', false, send),
    progress, result, el('h3', { text: 'All datasets' }), list);
  await refresh();
}
