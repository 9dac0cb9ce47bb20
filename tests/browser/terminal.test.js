// A real browser (Debian's Chromium driven by playwright-core) against a real hub started in
// dev mode, with a real agent: create a workspace, open its terminal, type, reload, and the
// earlier output is still there.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, waitFor, startHub, launchBrowser, killAgents, terminalText, runInTerminal } from './lib.js';

let state, hub, browser, context, listening, link;

before(async () => {
  assert.ok(existsSync(bin('workspace-hub')), 'build the workspace first (cargo build --workspace --bins)');
  state = mkdtempSync(join(tmpdir(), 'wsh-browser-'));
  ({ child: hub, listening, link } = await startHub(state));
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

test('type in the browser terminal, reload, and the output is still there', async () => {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  // The one-time link `workspace-hub dev` printed signs the browser in (a session cookie).
  await page.goto(link);
  await waitFor('signed in', async () => (await page.locator('#whoami').innerText()) === 'dev');
  await page.click('#create');
  const row = page.locator('tbody#list tr').first();
  await row.locator('button.open-terminal').waitFor({ timeout: 20000 });
  await row.locator('button.open-terminal').click();
  await page.locator('#terminal .xterm-rows').waitFor();
  await waitFor('connected', async () => (await page.locator('#terminal-status').innerText()) === 'connected');

  const marker = 'browser' + Math.floor(Math.random() * 1e9);
  await runInTerminal(page, `echo ${marker}-$((40+2))`, `${marker}-42`);

  await page.reload();
  await page.locator('tbody#list tr button.open-terminal').first().click();
  await waitFor('output after reload', async () => (await terminalText(page)).includes(`${marker}-42`));
  // Same session: typing still works and the old line is still on screen.
  await runInTerminal(page, 'echo again-$((1+1))', 'again-2');
  assert.ok((await terminalText(page)).includes(`${marker}-42`));
  if (process.env.SCREENSHOT_DIR) await page.screenshot({ path: join(process.env.SCREENSHOT_DIR, 'terminal.png') });
  assert.deepEqual(errors, []);
});

test('a network blip (the hub restarts) reconnects by itself and loses no output', async () => {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  await page.goto(`http://${listening.http}/`);
  await page.locator('tbody#list tr button.open-terminal').first().click();
  await waitFor('connected', async () => (await page.locator('#terminal-status').innerText()) === 'connected');
  await page.locator('#terminal').click();
  await page.keyboard.type('clear; for i in $(seq 1 12); do echo tick$i; sleep 0.25; done');
  await page.keyboard.press('Enter');
  await waitFor('tick2', async () => /^tick2$/m.test(await terminalText(page)));

  // The hub dies while the loop runs and comes back on the same addresses a second later.
  const { http, quic } = listening;
  hub.kill('SIGKILL');
  await new Promise(r => hub.once('exit', r));
  await waitFor('reconnecting', async () => (await page.locator('#terminal-status').innerText()).startsWith('reconnecting'));
  await new Promise(r => setTimeout(r, 1000));
  ({ child: hub } = await startHub(state, { http, quic }));

  await waitFor('tick12 after the blip', async () => /^tick12$/m.test(await terminalText(page)), 30000);
  await waitFor('connected again', async () => (await page.locator('#terminal-status').innerText()) === 'connected');
  const ticks = (await terminalText(page)).split('\n').map(l => l.trim()).filter(l => /^tick\d+$/.test(l));
  assert.deepEqual(ticks, Array.from({ length: 12 }, (_, i) => `tick${i + 1}`), 'every line once, in order');
  assert.deepEqual(errors, []);
});

test('a server started in the terminal shows up as a port with a working preview, and goes away', async () => {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  await page.goto(`http://${listening.http}/`);
  await page.locator('tbody#list tr button.open-terminal').first().click();
  await waitFor('connected', async () => (await page.locator('#terminal-status').innerText()) === 'connected');
  const port = 20000 + Math.floor(Math.random() * 20000);
  await runInTerminal(page, `${bin('test-server')} ${port} & echo started-$((1+1))`, 'started-2');

  const row = page.locator(`#ports tr[data-port="${port}"]`);
  await row.waitFor({ timeout: 20000 });
  assert.match(await row.innerText(), /test-server/);
  const link = row.locator('a.preview');
  await link.waitFor({ timeout: 20000 });
  const [preview] = await Promise.all([context.waitForEvent('page'), link.click()]);
  await preview.waitForLoadState();
  await waitFor('preview content', async () => (await preview.content()).includes('hello from test-server'));
  const host = new URL(preview.url()).host;
  assert.ok(host.startsWith(`${port}-`) && host.includes('.localhost:'), `preview on its own origin: ${host}`);
  await preview.close();

  await runInTerminal(page, 'kill %1; echo stopped-$((2+2))', 'stopped-4');
  await waitFor('port gone', async () => (await row.count()) === 0);
  assert.deepEqual(errors, []);
});
