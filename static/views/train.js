// Train: the run form, pre-filled with the server's defaults (GET /api/config). API
// validation errors appear next to the field they name.
import { api, apiAll } from '../api.js';
import { el, notice } from '../ui.js';

const MAIN = {
  backbone: 'Pretrained network',
  'warmup.enabled': 'Warm-up (backbone frozen, the new head is solved on its features)',
  'finetune.enabled': 'Fine-tune the top of the network',
  refit: 'Once the model is chosen, train it again on every photo',
  'finetune.epochs': 'Fine-tune epochs (at most)',
  'finetune.learning_rate': 'Fine-tune learning rate',
  'finetune.unfreeze': 'Unfrozen blocks (0–16 for Lite0, 0–21 for Lite1/Lite2, or "all")',
  'baseline.enabled': 'Also train a from-scratch baseline for comparison',
};

// Labels of the advanced settings; anything not listed shows its API name.
const LABELS = {
  input_size: 'Image size (pixels; empty for the network\'s own)',
  'warmup.l2': 'Head L2 penalty (empty: chosen by cross-validation)',
  'warmup.folds': 'Cross-validation folds on small data',
  val_fraction: 'Validation share',
  seed: 'Random seed',
  batch_size: 'Batch size',
  views: 'Views per photo',
  dropout: 'Dropout',
  weight_decay: 'Weight decay (L2)',
  class_weighting: 'Class weighting',
  max_image_dimension: 'Largest image side accepted (pixels)',
  min_images_per_class: 'Fewest images per class',
  'augment.enabled': 'Augmentation',
  'augment.zoom_min': 'Random zoom: smallest crop',
  'augment.rotation_degrees': 'Random rotation (degrees, either way)',
  'augment.brightness.0': 'Brightness: darkest factor',
  'augment.brightness.1': 'Brightness: brightest factor',
  'augment.flip': 'Random left-right flip',
  'augment.low_res_probability': 'Share of views shown at low resolution',
  'finetune.schedule': 'Fine-tune learning-rate schedule',
  'finetune.constant_epochs': 'Schedule: epochs at the full rate (constant_then_exponential)',
  'finetune.decay_rate': 'Schedule: decay per epoch after that',
  'finetune.patience': 'Fine-tune early stopping: epochs without improvement',
  'baseline.epochs': 'Baseline epochs (at most)',
  'baseline.learning_rate': 'Baseline learning rate',
  'baseline.max_seconds': 'Baseline time budget (seconds, empty for none)',
};

// Fields with a fixed set of values: a drop-down.
const CHOICES = {
  backbone: [['lite0', 'EfficientNet-Lite0, 224 px (fastest)'], ['lite1', 'EfficientNet-Lite1, 240 px'],
    ['lite2', 'EfficientNet-Lite2, 260 px'], ['auto', 'auto: Lite1 on small data, Lite0 when there is enough to fine-tune']],
  'finetune.enabled': [['auto', 'auto: only with 50+ photos per class, kept only if it helps'], ['true', 'always'], ['false', 'never']],
};

const HELP = {
  'augment.zoom_min': 'smallest random crop, as a share of the shorter side',
  'val_fraction': 'share of each class held out for validation',
  'views': 'views per training image in the cache (a clean one plus augmented ones)',
  'finetune.schedule': 'cosine or constant_then_exponential',
  'class_weighting': 'auto, on or off',
};

/** Every leaf of `config` as [path, value]. */
function leaves(obj, prefix = '') {
  return Object.entries(obj).flatMap(([k, v]) => {
    const path = prefix ? `${prefix}.${k}` : k;
    if (Array.isArray(v)) return v.map((x, i) => [`${path}.${i}`, x]);
    if (v !== null && typeof v === 'object') return leaves(v, path);
    return [[path, v]];
  });
}

function field(path, value) {
  const label = MAIN[path] || LABELS[path] || path;
  const id = `f-${path.replace(/\./g, '-')}`;
  let input;
  if (CHOICES[path]) {
    input = el('select', { id, name: path }, CHOICES[path].map(([v, text]) => el('option', { value: v, text, selected: String(value) === v })));
    return el('div.field', { 'data-field': path }, el('label', { for: id, text: label }), input, el('span.field-error'));
  }
  if (typeof value === 'boolean') {
    input = el('input', { type: 'checkbox', id, name: path, checked: value });
    return el('div.field.check', { 'data-field': path }, input, el('label', { for: id, text: label }), el('span.field-error'));
  }
  if (typeof value === 'number') input = el('input', { type: 'number', step: 'any', id, name: path, value });
  else input = el('input', { type: 'text', id, name: path, value: value ?? '' });
  input.dataset.kind = value === null ? 'nullable-number' : typeof value;
  return el('div.field', { 'data-field': path }, el('label', { for: id, text: label }), input,
    HELP[path] ? el('small.muted', { text: HELP[path] }) : null, el('span.field-error'));
}

/** Reads the form back into a config object shaped like `defaults`. */
function collect(form, defaults) {
  const config = structuredClone(defaults);
  for (const input of form.querySelectorAll('input[name], select[name]:not(#f-dataset)')) {
    const path = input.name.split('.');
    let target = config;
    for (const key of path.slice(0, -1)) target = target[key];
    const last = path[path.length - 1];
    let v;
    if (input.tagName === 'SELECT') v = { true: true, false: false }[input.value] ?? input.value;
    else if (input.type === 'checkbox') v = input.checked;
    else if (input.dataset.kind === 'number') v = input.value === '' ? NaN : Number(input.value);
    else if (input.dataset.kind === 'nullable-number') v = input.value === '' ? null : Number(input.value);
    else v = input.value;
    if (input.name === 'finetune.unfreeze') v = input.value.trim() === 'all' ? 'all' : Number(input.value);
    target[last] = v;
  }
  return config;
}

export async function trainView(view, datasetId) {
  const [datasets, defaults] = await Promise.all([apiAll('/api/datasets'), api('/api/config')]);
  if (!datasets.length) {
    view.append(el('h2', { text: 'Train' }), el('p', {}, 'Upload a dataset first: ', el('a', { href: '#/datasets', text: 'Datasets' })));
    return;
  }
  const select = el('select', { name: 'dataset', id: 'f-dataset' }, datasets.map((d) =>
    el('option', { value: d.id, selected: d.id === datasetId, text: `${d.name} (${d.total_images} images, ${d.classes.map((c) => c.name).join(', ')})` })));
  const all = leaves(defaults);
  const main = all.filter(([p]) => p in MAIN).sort((a, b) => Object.keys(MAIN).indexOf(a[0]) - Object.keys(MAIN).indexOf(b[0]));
  const advanced = all.filter(([p]) => !(p in MAIN));
  // The unfreeze value may be a number or "all": a text field.
  const mainFields = main.map(([p, v]) => field(p, p === 'finetune.unfreeze' ? String(v) : v));
  for (const f of mainFields) if (f.dataset.field === 'finetune.unfreeze') f.querySelector('input').dataset.kind = 'string';
  const form = el('form.train', { novalidate: true },
    el('div.field', {}, el('label', { for: 'f-dataset', text: 'Dataset' }), select),
    el('fieldset', {}, el('legend', { text: 'Network and phases' }), mainFields),
    el('details', {}, el('summary', { text: 'Advanced: augmentation, split, seed, schedule, early stopping' }),
      el('fieldset.grid', {}, advanced.map(([p, v]) => field(p, v)))),
    el('button.primary', { type: 'submit' }, 'Start training'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    for (const span of form.querySelectorAll('.field-error')) span.textContent = '';
    for (const f of form.querySelectorAll('.field.invalid')) f.classList.remove('invalid');
    try {
      const run = await api('/api/runs', { method: 'POST', json: { dataset_id: select.value, config: collect(form, defaults) } });
      location.hash = `#/runs/${run.id}`;
    } catch (err) {
      const name = (err.field || '').replace(/^config\./, '');
      const box = name && (form.querySelector(`[data-field="${CSS.escape(name)}"]`)
        || form.querySelector(`[data-field^="${CSS.escape(name)}."]`));
      if (box) {
        box.classList.add('invalid');
        box.querySelector('.field-error').textContent = err.message;
        box.closest('details')?.setAttribute('open', '');
        box.querySelector('input')?.focus();
      } else {
        notice(err.message);
      }
    }
  });
  view.append(el('h2', { text: 'Train a classifier' }), form);
}
