// The dashboard's workspace actions in a real browser: create a named workspace from a
// repository-less form, stop it, start it, delete it (confirming), with a screenshot of
// each view when SCREENSHOT_DIR is set.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, waitFor, startHub, launchBrowser, killAgents } from './lib.js';

let state, hub, browser, context, link, listening;

before(async () => {
  assert.ok(existsSync(bin('workspace-hub')), 'build the workspace first (cargo build --workspace --bins)');
  state = mkdtempSync(join(tmpdir(), 'wsh-dashboard-'));
  ({ child: hub, link, listening } = await startHub(state));
  browser = await launchBrowser();
  // One context: the session cookie from the sign-in link carries over between tests.
  context = await browser.newContext();
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
  const page = await context.newPage();
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

test('the activity verdict, keep-awake, port sharing and links, named sessions and API tokens', async () => {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  page.on('dialog', d => d.accept());
  await page.goto(`http://${listening.http}/`);
  await waitFor('signed in', async () => (await page.locator('#whoami').innerText()) === 'dev');
  await page.fill('#new-name', 'tools');
  await page.click('#create');
  const row = page.locator('tbody#list tr', { hasText: 'tools' });
  await row.locator('button.open-terminal').waitFor({ timeout: 20000 });
  await row.locator('button.open-terminal').click();
  await waitFor('connected', async () => (await page.locator('#terminal-status').innerText()) === 'connected');

  // Why it is active or idle, and a keep-awake lease shown there.
  await waitFor('activity', async () => /^(Active|Idle): /.test(await page.locator('#activity').innerText()));
  await page.click('#keep-awake');
  await waitFor('kept awake', async () => (await page.locator('#activity').innerText()).includes('kept awake until'));
  await page.click('#let-sleep');
  await waitFor('lease released', async () => !(await page.locator('#activity').innerText()).includes('kept awake until'));

  // A server's port: who may open it, and a share link.
  const port = 20000 + Math.floor(Math.random() * 20000);
  await page.locator('#terminal').click();
  await page.keyboard.type(`${bin('test-server')} ${port} & echo started-$((1+1))`);
  await page.keyboard.press('Enter');
  const portRow = page.locator(`#ports tr[data-port="${port}"]`);
  await portRow.locator('select.visibility').waitFor({ timeout: 20000 });
  await waitFor('sharing loaded', async () => (await portRow.locator('select.visibility').inputValue()) === 'private');
  await portRow.locator('select.visibility').selectOption('public');
  const id = await row.getAttribute('data-id');
  const visibility = async () => page.evaluate(async ([id, port]) =>
    (await (await fetch(`/workspaces/${id}/ports/${port}/sharing`)).json()).visibility, [id, port]);
  await waitFor('made public', async () => (await visibility()) === 'public');
  await portRow.locator('button.share-link').click();
  await waitFor('share link shown', async () => (await portRow.locator('input.share-url').inputValue()).includes('share='));
  await shot(page, 'dashboard-workspace');

  // A named session: created on first open, the same one on the next.
  await page.fill('#session-name', 'main');
  await page.click('#open-session');
  await waitFor('named session connected', async () => (await page.locator('#terminal-status').innerText()) === 'connected');
  await page.locator('#terminal').click();
  await page.keyboard.type('echo named-$((3*3))');
  await page.keyboard.press('Enter');
  const screen = () => page.locator('#terminal .xterm-rows').innerText();
  await waitFor('named output', async () => (await screen()).includes('named-9'));
  await page.fill('#session-name', '');
  await page.click('#open-session');
  await waitFor('a new unnamed session', async () => (await page.locator('#terminal-status').innerText()) === 'connected');
  await page.fill('#session-name', 'main');
  await page.click('#open-session');
  await waitFor('the named session again', async () => (await screen()).includes('named-9'));

  // API tokens: one made, shown once, listed, revoked.
  await page.fill('#token-name', 'laptop');
  await page.click('#create-token');
  await waitFor('token shown', async () => (await page.locator('#new-token-value').inputValue()).startsWith('wsh_'));
  const tokenRow = page.locator('#tokens tr', { hasText: 'laptop' });
  await tokenRow.waitFor();
  await shot(page, 'dashboard-tokens');
  await tokenRow.locator('button.revoke').click();
  await waitFor('token revoked', async () => (await tokenRow.count()) === 0);
  assert.deepEqual(errors, []);
});
