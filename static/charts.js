// Charts drawn by uPlot (vendored with its licence in vendor/uplot/).
import uPlot from './vendor/uplot/uPlot.esm.js';
import { el } from './ui.js';

const COLORS = ['#2f6fdf', '#e0782d', '#2a9d5c', '#b8336a', '#7b5ea7', '#8a8a8a'];

/** Mounts a uPlot chart that follows its container's width. */
function mount(opts, data, height = 240) {
  const box = el('div.chart');
  const make = () => {
    const width = Math.max(260, box.clientWidth || 600);
    const chart = new uPlot({ ...opts, width, height }, data, box);
    const resize = new ResizeObserver(() => chart.setSize({ width: Math.max(260, box.clientWidth), height }));
    resize.observe(box);
  };
  // Wait until the box is in the document and has a width.
  requestAnimationFrame(make);
  return box;
}

/** Vertical bars: one per label. */
export function barChart(labels, values, unit) {
  const xs = labels.map((_, i) => i);
  return mount({
    title: `${unit} per class`,
    legend: { show: false },
    scales: { x: { time: false, range: [-0.6, labels.length - 0.4] }, y: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] } },
    axes: [{ values: (u, ticks) => ticks.map((t) => labels[t] ?? ''), splits: () => xs }, {}],
    series: [{}, { label: unit, fill: '#2f6fdf88', stroke: '#2f6fdf', paths: uPlot.paths.bars({ size: [0.6, 80] }), points: { show: false } }],
  }, [xs, values], 200);
}

/** Draws a dashed vertical line at each `{x, label}` marker. */
function markers(list) {
  return {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.strokeStyle = '#888';
        ctx.setLineDash([6, 4]);
        ctx.fillStyle = '#555';
        ctx.font = `${12 * devicePixelRatio}px sans-serif`;
        for (const m of list) {
          const x = Math.round(u.valToPos(m.x, 'x', true));
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillText(m.label, x + 4, u.bbox.top + 14 * devicePixelRatio);
        }
        ctx.restore();
      }],
    },
  };
}

/**
 * Learning curves from the per-epoch rows: warm-up then fine-tune on one epoch axis with the
 * boundary marked, and the from-scratch baseline (its own epochs from 1) overlaid.
 */
export function learningCurves(metrics) {
  const transfer = metrics.filter((m) => m.phase !== 'baseline');
  const baseline = metrics.filter((m) => m.phase === 'baseline');
  const warm = transfer.filter((m) => m.phase === 'warmup').length;
  const n = Math.max(transfer.length, baseline.length, 1);
  const xs = Array.from({ length: n }, (_, i) => i + 1);
  const col = (rows, key) => xs.map((_, i) => (rows[i] ? rows[i][key] : null));
  const marks = warm > 0 && warm < transfer.length ? [{ x: warm + 0.5, label: 'fine-tune →' }] : [];
  const chart = (title, key, yRange) => {
    const series = [{ label: 'epoch' },
      { label: `train ${key}`, stroke: COLORS[0], width: 2 },
      { label: `validation ${key}`, stroke: COLORS[1], width: 2 }];
    const data = [xs, col(transfer, `train_${key}`), col(transfer, `val_${key}`)];
    if (baseline.length) {
      series.push({ label: `from scratch, validation ${key}`, stroke: COLORS[3], width: 2, dash: [8, 4] });
      data.push(col(baseline, `val_${key}`));
    }
    return mount({
      title,
      scales: { x: { time: false }, y: yRange ? { range: yRange } : {} },
      axes: [{ label: 'epoch' }, {}],
      series,
      plugins: [markers(marks)],
    }, data);
  };
  return el('div.curves', { 'data-testid': 'curves' },
    chart('Accuracy', 'accuracy', [0, 1]),
    chart('Loss', 'loss', null));
}
