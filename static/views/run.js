// One run, live from its SSE stream: phase, epoch, progress and ETA, cancel; learning curves;
// then the evaluation: confusion matrix, per-class scores, calibration, mistakes; then the
// audit of the dataset (views/audit.js), which can make a corrected dataset version.
import { api, follow, imageUrl } from '../api.js';
import { learningCurves } from '../charts.js';
import { el, badge, pct, duration, notice, short, when } from '../ui.js';
import { auditCard } from './audit.js';

const ENDED = ['succeeded', 'failed', 'cancelled'];

// What each stage is, in words for people who do not train networks.
const STAGES = {
  frozen_pass: 'Preparing: the pretrained network looks at every photo once',
  warmup: 'Warm-up: solving the new classification head',
  finetune: 'Fine-tune: adjusting the top of the pretrained network',
  baseline: 'Baseline: the same network trained from scratch, for comparison',
};

function phasesTable(run) {
  return el('table.list', {},
    el('thead', {}, el('tr', {}, ['phase', 'status', 'epochs', 'best epoch', 'best val. accuracy', 'best val. loss', 'time'].map((h) => el('th', { text: h })))),
    el('tbody', {}, run.phases.map((p) => el('tr', {},
      el('td', { text: p.phase }), el('td', {}, badge(p.status)),
      el('td', { text: `${p.epochs_run} / ${p.epochs_planned}` }),
      el('td', { text: p.best_epoch ?? '–' }),
      el('td', { text: pct(p.best_val_accuracy, 2) }),
      el('td', { text: p.best_val_loss?.toFixed(4) ?? '–' }),
      el('td', { text: duration(p.seconds) })))));
}

function heatMap(classes, confusion) {
  const max = Math.max(1, ...confusion.flat());
  return el('table.heat', { 'data-testid': 'confusion' },
    el('thead', {}, el('tr', {}, el('th', { text: 'true ↓ / predicted →' }), classes.map((c) => el('th', { text: c })))),
    el('tbody', {}, confusion.map((row, i) => el('tr', {}, el('th', { text: classes[i] }),
      row.map((n, j) => el('td', {
        text: n,
        title: `${n} ${classes[i]} predicted as ${classes[j]}`,
        style: { background: `rgba(${i === j ? '42,157,92' : '200,60,60'}, ${(0.1 + 0.9 * n / max).toFixed(2)})` },
      }))))));
}

// How the figures were measured and what the run decided, in words.
function decisions(t) {
  if (!t) return null;
  const n = t.estimate_images;
  const measured = t.estimate === 'kfold'
    ? `Measured by ${t.folds}-fold cross-validation over all ${n} photos: each photo was scored by a model that never saw it.`
    : `Measured on ${n} held-out validation photos, by a model trained on the others.`;
  const served = t.refit && t.trained_on_images > 0
    ? `The model you predict with was then trained on all ${t.trained_on_images} photos.`
    : `The model you predict with was trained on ${t.trained_on_images} photos.`;
  const path = t.head.path.length > 1
    ? ` (chosen among ${t.head.path.length} strengths by held-out loss)` : '';
  return el('section', { 'data-testid': 'decisions' },
    el('h4', { text: 'How this was measured, and what the run decided' }),
    el('ul', {}, [
      el('li', { text: measured }),
      el('li', { text: served }),
      el('li', { text: `Pretrained network: ${t.backbone} (${t.backbone_reason}).` }),
      el('li', { 'data-testid': 'finetune-decision', text: `Fine-tuning: ${t.finetune.reason}.` }),
      t.head.l2 == null ? null : el('li', { text: `Head: L2 penalty ${Number(t.head.l2).toPrecision(2)}${path}.` })].filter(Boolean)));
}

/** The evaluation card, and the run's classes. */
async function evaluation(id) {
  const e = await api(`/api/runs/${id}/evaluation`);
  const c = e.calibration;
  const t = e.training;
  const title = t?.estimate === 'kfold' ? `Estimated accuracy ${pct(e.accuracy, 2)} (cross-validated)` : `Validation accuracy ${pct(e.accuracy, 2)}`;
  const gallery = el('div.gallery', { 'data-testid': 'mistakes' });
  for (const m of e.misclassified) {
    const img = el('img', { alt: `${m.true_label} predicted as ${m.predicted}`, loading: 'lazy' });
    if (m.image_url) imageUrl(m.image_url).then((u) => { img.src = u; }).catch(() => { img.alt = 'image unavailable'; });
    const p = Math.max(...m.probabilities);
    gallery.append(el('figure', {}, img, el('figcaption', {}, el('b', { text: m.true_label }), ` seen as ${m.predicted} (${pct(p)})`, el('br'), el('small', { text: m.original_name ?? '' }))));
  }
  const card = el('section.card', { 'data-testid': 'evaluation' },
    el('h3', { text: title }),
    decisions(t),
    el('div.two', {},
      el('div', {}, el('h4', { text: 'Confusion matrix' }), heatMap(e.classes, e.confusion)),
      el('div', {}, el('h4', { text: 'Per class' }), el('table.list', {},
        el('thead', {}, el('tr', {}, ['class', 'precision', 'recall', 'F1', 'images'].map((h) => el('th', { text: h })))),
        el('tbody', {}, e.per_class.map((r) => el('tr', {}, el('td', { text: r.class }), el('td', { text: pct(r.precision) }),
          el('td', { text: pct(r.recall) }), el('td', { text: pct(r.f1) }), el('td', { text: r.support })))))),
    ),
    el('h4', { text: 'Calibration' }),
    el('p', { text: `Temperature ${c.temperature.toFixed(3)}; expected calibration error ${pct(c.ece_before, 2)} before, ${pct(c.ece_after, 2)} after; log-loss ${c.nll_before.toFixed(4)} → ${c.nll_after.toFixed(4)}.` }),
    el('h4', { text: e.misclassified.length ? `Misclassified held-out images (${e.misclassified.length})` : 'No held-out image was misclassified.' }),
    gallery);
  return [card, e.classes];
}

export async function runView(view, id) {
  const abort = new AbortController();
  let run = await api(`/api/runs/${id}`);
  let metrics = await api(`/api/runs/${id}/metrics`);
  const head = el('div.run-head');
  const live = el('div.live', { 'data-testid': 'live' });
  const phases = el('div');
  const curves = el('div');
  const result = el('div');
  view.append(head, live, phases, el('h3', { text: 'Learning curves' }), curves, result);

  const drawHead = () => {
    const cancel = !ENDED.includes(run.status) && el('button.danger', { onclick: async () => {
      try { run = await api(`/api/runs/${id}/cancel`, { method: 'POST' }); drawHead(); notice('Cancelling: the run stops at its next step', 'ok'); } catch (e) { notice(e.message); }
    } }, run.cancel_requested ? 'Cancelling…' : 'Cancel');
    head.replaceChildren(...[el('h2', {}, `Run ${short(id)} `, badge(run.status), ' ', cancel || ''),
      el('p.muted', { text: `dataset ${short(run.dataset_id)} · created ${when(run.created_at)}${run.attempts > 1 ? ` · attempt ${run.attempts}` : ''}` }),
      run.error ? el('p.error-text', { text: run.error }) : null].filter(Boolean));
    phases.replaceChildren(phasesTable(run));
  };
  const drawLive = (p) => {
    if (ENDED.includes(run.status)) { live.replaceChildren(); return; }
    const epoch = p.epoch ? ` · epoch ${p.epoch}${p.epochs_total ? ` of at most ${p.epochs_total}` : ''}` : '';
    const step = p.steps_total ? ` · step ${p.step} / ${p.steps_total}` : '';
    const stage = STAGES[p.phase] ?? 'Starting';
    live.replaceChildren(el('p', { text: run.status === 'queued' ? 'Queued: waiting for the worker.' : `${stage}${epoch}${step}` }),
      el('progress', { max: 100, value: p.percent ?? 0 }),
      el('span', { text: ` ${(p.percent ?? 0).toFixed(0)}% · ${duration(p.eta_seconds)} left` }));
  };
  let pending = null;
  const drawCurves = () => {
    pending = null;
    curves.replaceChildren(metrics.length ? learningCurves(metrics) : el('p.muted', { text: 'Curves appear after the first epoch.' }));
  };
  const finish = async () => {
    drawHead();
    live.replaceChildren();
    metrics = await api(`/api/runs/${id}/metrics`);
    drawCurves();
    if (run.status === 'succeeded') {
      const [card, classes] = await evaluation(id);
      result.replaceChildren(card, auditCard(id, classes));
    }
  };

  drawHead();
  drawLive(run);
  drawCurves();
  if (ENDED.includes(run.status)) {
    await finish();
    return () => abort.abort();
  }
  follow(id, async (name, data) => {
    if (name === 'snapshot') { run = data; drawHead(); drawLive(run); }
    else if (name === 'progress') drawLive(data);
    else if (name === 'epoch') { metrics.push(data.metrics); pending ??= setTimeout(drawCurves, 500); }
    else if (name === 'phase_finished') { run = await api(`/api/runs/${id}`); drawHead(); }
    else if (name === 'status') {
      run = await api(`/api/runs/${id}`);
      if (ENDED.includes(run.status)) await finish(); else drawHead();
    }
  }, abort.signal).catch((e) => { if (e.name !== 'AbortError') notice(e.message); });
  return () => { abort.abort(); clearTimeout(pending); };
}
