// Runs: every run with its live status; refreshed while any is queued or running.
import { apiAll } from '../api.js';
import { el, badge, pct, when, short, duration } from '../ui.js';

export async function runsView(view) {
  const body = el('div');
  view.append(el('h2', { text: 'Runs' }), body);
  let timer = null;
  async function refresh() {
    const runs = await apiAll('/api/runs');
    if (!runs.length) {
      body.replaceChildren(el('p', {}, 'No run yet. ', el('a', { href: '#/train', text: 'Train one' })));
      return;
    }
    body.replaceChildren(el('table.list', { 'data-testid': 'runs' },
      el('thead', {}, el('tr', {}, ['run', 'status', 'progress', 'best val. accuracy', 'created'].map((h) => el('th', { text: h })))),
      el('tbody', {}, runs.map((r) => el('tr', {},
        el('td', {}, el('a', { href: `#/runs/${r.id}`, text: short(r.id) })),
        el('td', {}, badge(r.status)),
        el('td', {}, r.status === 'running'
          ? [el('progress', { max: 100, value: r.percent }), ` ${r.phase ?? ''} · ${duration(r.eta_seconds)} left`]
          : r.error ?? ''),
        el('td', { text: pct(r.best_val_accuracy, 2) }),
        el('td', { text: when(r.created_at) }))))));
    clearTimeout(timer);
    if (runs.some((r) => r.status === 'queued' || r.status === 'running')) timer = setTimeout(() => refresh().catch(() => {}), 2000);
  }
  await refresh();
  return () => clearTimeout(timer);
}
