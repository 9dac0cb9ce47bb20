// The dashboard's workspace actions in a real browser: create a named workspace from a
// repository-less form, stop it, start it, delete it (confirming), with a screenshot of
// each view when SCREENSHOT_DIR is set.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, waitFor, startHub, launchBrowser, killAgents } from './lib.js';

let state, hub, browser, link;

before(async () => {
  assert.ok(existsSync(bin('workspace-hub')), 'build the workspace first (cargo build --workspace --bins)');
  state = mkdtempSync(join(tmpdir(), 'wsh-dashboard-'));
  ({ child: hub, link } = await startHub(state));
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (hub) hub.kill('SIGKILL');
  killAgents(state);
  rmSync(state, { recursive: true, force: true });
});

async function shot(page, name) {
  if (process.env.SCREENSHOT_DIR) await page.screenshot({ path: join(process.env.SCREENSHOT_DIR, name + '.png'), fullPage: true });
}

test('create a named workspace, stop, start and delete it from the dashboard', async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  await page.goto(link);
  await waitFor('signed in', async () => (await page.locator('#whoami').innerText()) === 'dev');

  // A bad name is refused with the hub's message; a good one is created.
  await page.fill('#new-name', 'Bad_Name');
  await page.click('#create');
  await waitFor('invalid name refused', async () => (await page.locator('#error').innerText()).includes('invalid_request'));
  await page.fill('#new-name', 'demo');
  await page.click('#create');
  const row = page.locator('tbody#list tr', { hasText: 'demo' });
  await row.locator('button.stop').waitFor({ timeout: 20000 });
  assert.match(await row.innerText(), /demo · [0-9a-f-]{36}/);
  assert.match(await row.innerText(), /READY/);
  await shot(page, 'dashboard-ready');

  // The name is taken now.
  await page.fill('#new-name', 'demo');
  await page.click('#create');
  await waitFor('taken name refused', async () => (await page.locator('#error').innerText()).includes('name_taken'));

  await row.locator('button.stop').click();
  await row.locator('button.start').waitFor({ timeout: 20000 });
  assert.match(await row.innerText(), /SUSPENDED/);
  await shot(page, 'dashboard-suspended');
  await row.locator('button.start').click();
  await row.locator('button.stop').waitFor({ timeout: 20000 });
  assert.match(await row.innerText(), /READY/);

  // Deleting asks first: dismissed, nothing happens; accepted, the workspace goes.
  page.once('dialog', d => d.dismiss());
  await row.locator('button.delete').click();
  await new Promise(r => setTimeout(r, 300));
  assert.equal(await row.count(), 1);
  page.once('dialog', d => { assert.match(d.message(), /demo/); d.accept(); });
  await row.locator('button.delete').click();
  await waitFor('workspace gone', async () => (await row.count()) === 0, 20000);
  await shot(page, 'dashboard-deleted');

  // Phone width: the form and the list still fit.
  await page.setViewportSize({ width: 380, height: 800 });
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 380 + 1, `no sideways scrolling at phone width (${width}px)`);
  await shot(page, 'dashboard-phone');
  assert.deepEqual(errors, []);
});
