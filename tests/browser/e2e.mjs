// The web page end to end in Debian's headless Chromium, driven by playwright-core, against
// a real transferd on port 0 with its own data directory. Run by tests/browser.rs, which
// passes TRANSFERD_BIN, TRANSFERD_WEIGHTS, PETS_ZIP (the 24 pets plus dog/cat0-copy.jpg, a
// re-encoded copy of a cat), FOREIGN (a PNG of flat stripes), SAMPLES and SCREENSHOTS.
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const env = (k) => { const v = process.env[k]; if (!v) throw new Error(`${k} is not set`); return v; };
const shots = env('SCREENSHOTS');
mkdirSync(shots, { recursive: true });
const data = mkdtempSync(join(tmpdir(), 'transferd-browser-'));

const server = spawn(env('TRANSFERD_BIN'), ['--data-dir', data, '--log-format', 'json', 'serve',
  '--addr', '127.0.0.1:0', '--device', 'cpu', '--min-images-per-class', '2',
  '--weights', env('TRANSFERD_WEIGHTS'), '--static-dir', env('STATIC_DIR')], { stdio: ['ignore', 'ignore', 'pipe'] });
const base = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error('the server did not start')), 60000);
  createInterface({ input: server.stderr }).on('line', (line) => {
    try {
      const e = JSON.parse(line);
      if (e.fields?.message === 'listening') { clearTimeout(timer); resolve(`http://${e.fields.addr}`); }
      if (e.level === 'ERROR') console.error('server:', line);
    } catch { /* not JSON */ }
  });
  server.on('exit', (code) => reject(new Error(`the server exited with ${code}`)));
});

const problems = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
/** Chromium logs a provoked 422 as a console error: exactly that one, and nothing else. */
function expectOnly422(what) {
  if (problems.length !== 1 || !problems[0].includes('422')) {
    throw new Error(`after ${what}, expected one logged 422, got:\n${problems.join('\n')}`);
  }
  problems.length = 0;
}

let step = 0;
async function shot(page, name) {
  step += 1;
  await page.screenshot({ path: join(shots, `${String(step).padStart(2, '0')}-${name}.png`), fullPage: true });
  console.log(`step ${step}: ${name}`);
}

const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
const page = await context.newPage();
try {
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.setDefaultTimeout(30000);

  // 1. Upload the fixture zip through the drop zone's file picker; see the report: 12 cats,
  //    13 dogs (the 12 and a copy of a cat filed under dog).
  await page.goto(`${base}/`);
  await page.getByLabel('dataset name').fill('pets');
  await page.locator('.drop input[type=file]').setInputFiles(env('PETS_ZIP'));
  const report = page.getByTestId('dataset-report');
  await report.waitFor();
  if (!(await report.textContent()).includes('25 images')) throw new Error('the report does not show 25 images');
  await report.locator('canvas').first().waitFor();
  await page.getByText('dog (13)').waitFor();
  if (!(await page.getByText('dog (13)').textContent()).includes('cat (12)')) throw new Error('the list does not show 12 cats and 13 dogs');
  await shot(page, 'dataset-report');

  // 2. The train form: a bad value is shown next to its field, then a tiny run starts.
  await page.getByRole('link', { name: 'Train on this dataset' }).click();
  await page.locator('form.train').waitFor();
  await page.locator('input[name="finetune.epochs"]').fill('-3');
  await page.getByRole('button', { name: 'Start training' }).click();
  const bad = page.locator('.field.invalid[data-field="finetune.epochs"] .field-error');
  await bad.waitFor();
  await shot(page, 'field-error');
  expectOnly422('the refused run');
  await page.locator('details summary').click();
  for (const [name, value] of [['input_size', '128'], ['batch_size', '8'], ['finetune.epochs', '2']]) {
    await page.locator(`input[name="${name}"]`).fill(value);
  }
  await page.getByRole('button', { name: 'Start training' }).click();

  // 3. The run page follows the run live until it succeeds, with curves and the evaluation.
  await page.waitForURL(/#\/runs\//);
  await page.locator('.run-head .badge.running, .run-head .badge.queued, .run-head .badge.succeeded').first().waitFor();
  await shot(page, 'run-live');
  await page.locator('.run-head .badge.succeeded').waitFor({ timeout: 180000 });
  await page.getByTestId('evaluation').waitFor();
  const curves = page.getByTestId('curves').locator('canvas');
  if ((await curves.count()) < 2) throw new Error('the learning curves are not drawn');
  await page.getByTestId('confusion').waitFor();
  // 25 photos are small data: the page says the head alone was trained, and why.
  const decision = await page.getByTestId('finetune-decision').textContent();
  if (!decision.includes('small data')) throw new Error(`the fine-tune decision is not shown: ${decision}`);
  const decisions = await page.getByTestId('decisions').textContent();
  if (!decisions.includes('cross-validation')) throw new Error('the estimate is not explained');
  if (!decisions.includes('lite1 (auto: small data')) throw new Error(`auto did not pick Lite1 for small data: ${decisions}`);
  await shot(page, 'run-succeeded');

  // 3b. The audit finds the cat filed under dog as a cross-class near-duplicate; excluding it
  //     makes a new dataset version with one image fewer (the original is unchanged).
  const audit = page.getByTestId('audit');
  await audit.waitFor();
  const duplicates = audit.locator('[data-testid="audit-item"][data-kind="duplicate"]');
  await duplicates.first().waitFor();
  const copy = duplicates.filter({ hasText: 'cat0-copy' }).first();
  await copy.waitFor();
  if ((await copy.getAttribute('data-duplicate')) !== 'cross_class') throw new Error('the copy of a cat under dog is not a cross-class duplicate');
  await copy.locator('[data-testid="audit-choice"][aria-label*="cat0-copy"]').selectOption('exclude');
  await audit.getByTestId('create-version').click();
  const version = audit.getByTestId('new-version').getByTestId('dataset-report');
  await version.waitFor();
  const versionText = await version.textContent();
  if (!versionText.includes('24 images')) throw new Error(`the new version does not have 24 images: ${versionText}`);
  if (!(await version.getByRole('link', { name: 'Train on this dataset' }).getAttribute('href')).startsWith('#/train?dataset=')) {
    throw new Error('the new version has no link to train it');
  }
  await shot(page, 'audit-new-version');

  // 4. Models and predict: drop two photos, see their probability bars; they are not unknown.
  //    Then a flat pattern: "none of the classes", with its out-of-distribution score.
  await page.getByRole('link', { name: 'Models & predict' }).click();
  await page.getByTestId('models').waitFor();
  if (!(await page.getByTestId('models').textContent()).includes('default')) throw new Error('no default model marked');
  // Export: the ONNX button downloads the file the API serves.
  const [file] = await Promise.all([page.waitForEvent('download'), page.getByTestId('export-onnx').first().click()]);
  if (!file.suggestedFilename().endsWith('.onnx')) throw new Error(`the export is named ${file.suggestedFilename()}`);
  await page.locator('.drop input[type=file]').setInputFiles([join(env('SAMPLES'), 'test_cat.jpg'), join(env('SAMPLES'), 'test_dog.jpg')]);
  await page.locator('.prediction').nth(1).waitFor();
  const text = await page.getByTestId('predictions').textContent();
  if (!/cat|dog/.test(text)) throw new Error(`no prediction shown: ${text}`);
  if (await page.getByTestId('unknown').count()) throw new Error(`a pet photo is called none of the classes: ${text}`);
  await shot(page, 'predictions');
  await page.locator('.drop input[type=file]').setInputFiles(env('FOREIGN'));
  const unknown = page.getByTestId('unknown');
  await unknown.waitFor();
  if (!(await unknown.textContent()).includes('none of the classes')) throw new Error('the foreign image is not called none of the classes');
  if (!(await page.getByTestId('predictions').getByTestId('ood').count())) throw new Error('the out-of-distribution score is not shown');
  await shot(page, 'prediction-unknown');

  // 5. An API error is shown as a readable message, not a silent failure.
  if (problems.length) throw new Error(problems.join('\n'));
  await page.locator('.drop input[type=file]').setInputFiles({ name: 'notes.jpg', mimeType: 'image/jpeg', buffer: Buffer.from('not a photo') });
  await page.locator('#notice.error').waitFor();
  if (!(await page.locator('#notice').textContent()).includes('not an image')) throw new Error('the API error is not shown');
  await shot(page, 'api-error');
  expectOnly422('the refused prediction');

  // 6. Phone width.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${base}/#/runs`);
  await page.getByTestId('runs').waitFor();
  await shot(page, 'phone-runs');
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 2) throw new Error(`the page is ${overflow}px wider than a phone screen`);

  if (problems.length) throw new Error(problems.join('\n'));
  console.log(`ok: ${step} steps, screenshots in ${shots}`);
} catch (e) {
  await page.screenshot({ path: join(shots, 'failure.png'), fullPage: true }).catch(() => {});
  console.error(problems.join('\n'));
  throw e;
} finally {
  await browser.close();
  server.kill('SIGTERM');
  rmSync(data, { recursive: true, force: true });
}
