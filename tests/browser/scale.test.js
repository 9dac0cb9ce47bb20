// The dashboard with a thousand workspaces (manual provider: records without agents): the
// list shows them all, the filter narrows it to one, and actions on that one work.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { waitFor, startHub, launchBrowser, killAgents } from './lib.js';

const COUNT = 1000;
let state, hub, browser, link;

before(async () => {
  state = mkdtempSync(join(tmpdir(), 'wsh-scale-'));
  const config = join(state, 'hub.toml');
  writeFileSync(config, '[quotas]\nmax_workspaces = 2000\nmax_running = 2000\n');
  ({ child: hub, link } = await startHub(state, { config, provider: 'manual' }));
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (hub) hub.kill('SIGKILL');
  killAgents(state);
  rmSync(state, { recursive: true, force: true });
});

test(`the dashboard lists, filters and acts on ${COUNT} workspaces`, async () => {
  const page = await (await browser.newContext()).newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  page.on('dialog', d => d.accept());
  await page.goto(link);
  await waitFor('signed in', async () => (await page.locator('#whoami').innerText()) === 'dev');
  // Created through the API from the page's own session, 16 at a time; records only (the
  // manual provider hands each agent's config back instead of starting one).
  const created = await page.evaluate(async count => {
    const { csrf_token } = await (await fetch('/session')).json();
    const first = await fetch('/workspaces', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf_token },
      body: JSON.stringify({ name: 'probe' }),
    });
    if (!(await first.json()).agent_config) return -1;
    let next = 0, ok = 0;
    const worker = async () => {
      while (next < count) {
        const i = next++;
        const res = await fetch('/workspaces', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf_token },
          body: JSON.stringify({ name: 'ws-' + String(i).padStart(4, '0') }),
        });
        if (res.status === 201) ok++;
      }
    };
    await Promise.all(Array.from({ length: 16 }, worker));
    return ok;
  }, COUNT);
  assert.equal(created, COUNT, 'the manual provider (no agent processes) and every create');

  const rows = page.locator('tbody#list tr');
  const started = Date.now();
  await waitFor('every workspace listed', async () => (await rows.count()) === COUNT + 1, 30000);
  console.log(`# ${COUNT} workspaces listed ${Date.now() - started} ms after the last create`);
  assert.equal(await page.locator('#shown').innerText(), `${COUNT + 1} workspaces`);

  // The filter narrows the list to one; deleting it leaves the others.
  await page.fill('#filter', 'ws-0777');
  await waitFor('filtered', async () => (await rows.count()) === 1);
  assert.equal(await page.locator('#shown').innerText(), `1 of ${COUNT + 1}`);
  await rows.first().locator('button.delete').click();
  await waitFor('deleted', async () => (await rows.count()) === 0, 20000);
  await page.fill('#filter', '');
  await waitFor('the rest listed', async () => (await rows.count()) === COUNT, 20000);

  // Phone width with a thousand rows: nothing scrolls sideways.
  await page.setViewportSize({ width: 380, height: 800 });
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 381, `no sideways scrolling at phone width (${width}px)`);
  assert.deepEqual(errors, []);
});
