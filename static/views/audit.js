// The audit of a succeeded run's dataset (GET /api/runs/{id}/audit): likely label errors
// (out-of-fold), near-duplicates and outliers. Each photo gets keep / exclude / relabel, and
// the choices become a new dataset version (POST /api/datasets/{id}/versions); the original
// dataset stays as it is.
import { api, imageUrl } from '../api.js';
import { el, pct } from '../ui.js';
import { report } from './datasets.js';

const SHOWN = 12; // findings per list before "Show all"

const plural = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;
const photoName = (p) => p.original_name ?? (p.file_id != null ? `photo ${p.file_id}` : 'a photo');
const similarity = (s) => (s >= 0.995 ? s.toFixed(3) : s.toFixed(2));

/** A thumbnail fetched with the API key, as the evaluation's mistakes are. */
function thumb(photo) {
  const img = el('img', { alt: photoName(photo), loading: 'lazy' });
  if (photo.image_url) imageUrl(photo.image_url).then((u) => { img.src = u; }).catch(() => { img.alt = 'image unavailable'; });
  else img.alt = 'image unavailable';
  return img;
}

/** One choice per photo (by file id), shared by every finding that shows that photo. */
function chooser(classes, onChange) {
  const state = new Map(); // file_id -> { action, label }
  const controls = new Map(); // file_id -> [{ action, label }]

  function set(id, action, label) {
    if (action === 'keep') state.delete(id); else state.set(id, { action, label });
    for (const c of controls.get(id)) {
      c.action.value = action;
      if (action === 'relabel') c.label.value = label;
      c.label.hidden = action !== 'relabel';
    }
    onChange();
  }

  function control(photo, suggested) {
    const id = photo.file_id;
    if (id === null || id === undefined) return el('small.muted', { text: 'This photo cannot be changed here.' });
    const others = classes.filter((c) => c !== photo.label);
    const name = photoName(photo);
    const action = el('select', { 'data-testid': 'audit-choice', 'aria-label': `what to do with ${name}` },
      el('option', { value: 'keep', text: 'keep' }), el('option', { value: 'exclude', text: 'exclude' }),
      el('option', { value: 'relabel', text: 'relabel as…', disabled: !others.length }));
    const label = el('select', { 'data-testid': 'audit-label', 'aria-label': `new label for ${name}`, hidden: true },
      others.map((c) => el('option', { value: c, text: c, selected: c === suggested })));
    const mine = { action, label };
    controls.set(id, [...(controls.get(id) ?? []), mine]);
    const now = state.get(id);
    if (now) { action.value = now.action; if (now.action === 'relabel') label.value = now.label; label.hidden = now.action !== 'relabel'; }
    action.addEventListener('change', () => set(id, action.value, label.value));
    label.addEventListener('change', () => set(id, 'relabel', label.value));
    return el('div.choice', {}, action, label);
  }

  const request = () => ({
    exclude: [...state].filter(([, c]) => c.action === 'exclude').map(([id]) => id),
    relabel: [...state].filter(([, c]) => c.action === 'relabel').map(([id, c]) => ({ file_id: id, label: c.label })),
  });
  return { control, request };
}

/** One photo of a finding: thumbnail, where it is, and its choice. */
function photoBox(photo, choose, suggested) {
  return el('div.photo', {}, thumb(photo),
    el('small.muted', { text: `${photoName(photo)} · ${photo.label} · ${photo.split}` }),
    choose.control(photo, suggested));
}

function labelItem(f, choose) {
  return el('figure.finding', { 'data-testid': 'audit-item', 'data-kind': 'label' },
    el('figcaption.reason', { text: `labelled ${f.given ?? f.photo.label}, looks like ${f.suggested} (${pct(f.suggested_probability, 0)})` }),
    photoBox(f.photo, choose, f.suggested),
    el('small', { text: `suggested label: ${f.suggested}` }));
}

function duplicateReason(d) {
  const s = similarity(d.similarity);
  if (d.kind === 'cross_class') return `near-duplicate (similarity ${s}) of ${photoName(d.a)} in another class: ${d.a.label} there, ${d.b.label} here`;
  if (d.kind === 'train_val') return `same photo in training and validation (similarity ${s}): it inflates the measured accuracy`;
  return `near-duplicate (similarity ${s}) in the same class`;
}

function duplicateItem(d, choose, suggestions) {
  // Across classes, each photo's natural relabel is its twin's class.
  const cross = d.kind === 'cross_class';
  return el('figure.finding', { 'data-testid': 'audit-item', 'data-kind': 'duplicate', 'data-duplicate': d.kind },
    el('figcaption.reason', { text: duplicateReason(d) }),
    el('div.pair', {},
      photoBox(d.a, choose, suggestions.get(d.a.file_id) ?? (cross ? d.b.label : undefined)),
      photoBox(d.b, choose, suggestions.get(d.b.file_id) ?? (cross ? d.a.label : undefined))));
}

function outlierItem(o, threshold, choose, suggestions) {
  return el('figure.finding', { 'data-testid': 'audit-item', 'data-kind': 'outlier' },
    el('figcaption.reason', { text: `far from every class (score ${Number(o.score).toFixed(1)}${threshold != null ? `, flagged above ${threshold}` : ''})` }),
    photoBox(o.photo, choose, suggestions.get(o.photo.file_id)));
}

/** A heading and the first findings of a list, with a button for the rest. */
function list(title, items, render) {
  if (!items.length) return null;
  const grid = el('div.findings', {}, items.slice(0, SHOWN).map(render));
  const rest = items.length > SHOWN && el('button.link', { onclick: () => { grid.append(...items.slice(SHOWN).map(render)); rest.remove(); } },
    `Show all ${items.length}`);
  return [el('h4', { text: `${title} (${items.length})` }), grid, rest];
}

function summary(a) {
  const t = a.thresholds ?? {};
  // `counts` are the totals before the lists were cut.
  const n = { label_issues: a.label_issues.length, near_duplicates: a.near_duplicates.length, outliers: a.outliers.length, ...a.counts };
  const pairs = [n.cross_class ? `${n.cross_class} across classes` : null, n.train_val ? `${n.train_val} between training and validation` : null].filter(Boolean);
  const cut = n.label_issues > a.label_issues.length || n.near_duplicates > a.near_duplicates.length || n.outliers > a.outliers.length;
  return el('p', { text: `Checked ${plural(a.photos, 'photo')} three ways: each photo's label against a model that never saw it (out-of-fold), `
    + `pairs of nearly identical photos${t.duplicate_similarity != null ? ` (similarity ${t.duplicate_similarity} or more)` : ''}, `
    + `and photos far from every class${t.outlier_score != null ? ` (outlier score above ${t.outlier_score})` : ''}. `
    + `Found ${plural(n.label_issues, 'likely label error')}, ${plural(n.near_duplicates, 'near-duplicate pair')}${pairs.length ? ` (${pairs.join(', ')})` : ''} `
    + `and ${plural(n.outliers, 'outlier')}.${cut ? ' The most suspicious are listed below.' : ''}` });
}

/** The form that turns the choices into a new dataset version. */
function versionForm(a, choose) {
  const name = el('input', { placeholder: 'name of the new version (optional)', 'aria-label': 'new dataset name' });
  const counts = el('span.muted');
  const out = el('div', { 'data-testid': 'new-version' });
  const button = el('button.primary', { 'data-testid': 'create-version', disabled: true, onclick: async () => {
    button.disabled = true;
    out.replaceChildren(el('p.muted', { text: 'Creating the new version…' }));
    try {
      const ds = await api(`/api/datasets/${a.dataset_id}/versions`, { method: 'POST', json: { name: name.value.trim() || undefined, ...choose.request() } });
      const o = ds.origin ?? {};
      out.replaceChildren(el('p', { text: `Created ${ds.name}: ${plural(ds.total_images, 'image')} (${o.excluded ?? 0} excluded, ${o.relabelled ?? 0} relabelled). The original dataset is unchanged.` }),
        report(ds));
    } catch (e) {
      out.replaceChildren(el('p.error-text', { 'data-testid': 'version-error', text: `The new version was refused: ${e.message}` }));
    } finally {
      update();
    }
  } }, 'Create a new dataset version');
  function update() {
    const r = choose.request();
    counts.textContent = r.exclude.length || r.relabel.length
      ? ` ${r.exclude.length} to exclude, ${r.relabel.length} to relabel`
      : ' Choose exclude or relabel for a photo first.';
    button.disabled = !r.exclude.length && !r.relabel.length;
  }
  return { node: [el('div.version', {}, name, button, counts), out], update };
}

function body(a, classes) {
  if (!a.label_issues.length && !a.near_duplicates.length && !a.outliers.length) {
    return [summary(a), el('p', { text: 'No likely label errors, near-duplicates or outliers found.' })];
  }
  const photos = [...a.label_issues.map((f) => f.photo), ...a.near_duplicates.flatMap((d) => [d.a, d.b]), ...a.outliers.map((o) => o.photo)];
  const labels = [...new Set([...(classes ?? []), ...photos.map((p) => p.label), ...a.label_issues.map((f) => f.suggested)])];
  let form = null;
  const choose = chooser(labels, () => form.update());
  form = versionForm(a, choose);
  form.update();
  const suggestions = new Map(a.label_issues.filter((f) => f.photo.file_id != null).map((f) => [f.photo.file_id, f.suggested]));
  return [summary(a),
    list('Likely label errors', a.label_issues, (f) => labelItem(f, choose)),
    list('Near-duplicates', a.near_duplicates, (d) => duplicateItem(d, choose, suggestions)),
    list('Outliers', a.outliers, (o) => outlierItem(o, a.thresholds?.outlier_score, choose, suggestions)),
    el('p.muted', { text: 'Keep, exclude or relabel each photo, then create a new version of the dataset to train on.' }),
    form.node];
}

/** The audit card; it fills in once the audit is read. `classes`: the run's classes. */
export function auditCard(runId, classes) {
  const card = el('section.card.audit', { 'data-testid': 'audit' },
    el('h3', { text: 'Audit of the dataset' }), el('p.muted', { text: 'Reading the audit…' }));
  api(`/api/runs/${runId}/audit`).then((a) => {
    card.replaceChildren(card.firstChild, ...body(a, classes).flat().filter(Boolean));
  }).catch((e) => {
    card.replaceChildren(card.firstChild, e.status === 404
      ? el('p.muted', { text: 'No audit for this run: it finished before audits existed.' })
      : el('p.error-text', { text: `The audit could not be read: ${e.message}` }));
  });
  return card;
}
