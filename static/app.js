// transferd's page: a hash router over the views. Everything goes through the public API.
import { notice } from './ui.js';
import { datasetsView } from './views/datasets.js';
import { trainView } from './views/train.js';
import { runsView } from './views/runs.js';
import { runView } from './views/run.js';
import { modelsView } from './views/models.js';

const routes = [
  [/^#\/datasets$/, (m, view) => datasetsView(view)],
  [/^#\/train(?:\?dataset=([\w-]+))?$/, (m, view) => trainView(view, m[1])],
  [/^#\/runs$/, (m, view) => runsView(view)],
  [/^#\/runs\/([\w-]+)$/, (m, view) => runView(view, m[1])],
  [/^#\/models$/, (m, view) => modelsView(view)],
];

let teardown = null;

async function render() {
  const hash = location.hash || '#/datasets';
  if (teardown) { teardown(); teardown = null; }
  document.getElementById('notice').hidden = true;
  for (const a of document.querySelectorAll('nav a')) {
    a.classList.toggle('active', hash.startsWith(`#/${a.dataset.nav}`));
  }
  const view = document.getElementById('view');
  for (const [pattern, make] of routes) {
    const m = hash.match(pattern);
    if (m) {
      view.replaceChildren();
      try {
        teardown = (await make(m, view)) || null;
      } catch (e) {
        notice(e.message);
      }
      return;
    }
  }
  location.hash = '#/datasets';
}

window.addEventListener('hashchange', render);
window.addEventListener('unhandledrejection', (e) => notice(e.reason?.message || String(e.reason)));
render();
