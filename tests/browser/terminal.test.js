// A real browser (Debian's Chromium driven by playwright-core) against a real hub started in
// dev mode, with a real agent: create a workspace, open its terminal, type, reload, and the
// earlier output is still there.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, existsSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const root = resolve(import.meta.dirname, '../..');
const hubBin = join(root, 'target/debug/workspace-hub');
let state, hub, browser, listening, token;

async function waitFor(what, fn, ms = 20000) {
  const start = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - start > ms) throw new Error('timed out waiting for ' + what);
    await new Promise(r => setTimeout(r, 50));
  }
}

async function startHub(http = '127.0.0.1:0', quic = '127.0.0.1:0') {
  rmSync(join(state, 'hub.json'), { force: true });
  hub = spawn(hubBin, ['dev', '--state-dir', state, '--http', http, '--quic', quic], {
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...process.env, RUST_LOG: 'warn' },
  });
  listening = await waitFor('hub.json', () => {
    try { return JSON.parse(readFileSync(join(state, 'hub.json'), 'utf8')); } catch { return null; }
  });
}

before(async () => {
  assert.ok(existsSync(hubBin), 'build the workspace first (cargo build --workspace --bins)');
  state = mkdtempSync(join(tmpdir(), 'wsh-browser-'));
  await startHub();
  token = readFileSync(join(state, 'dev-token'), 'utf8').trim();
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (hub) hub.kill('SIGKILL');
  // Agents outlive the hub by design (like VMs); end them with the test.
  const dir = join(state, 'workspaces');
  if (existsSync(dir)) {
    for (const ws of readdirSync(dir)) {
      try { process.kill(-Number(readFileSync(join(dir, ws, 'agent.pid'), 'utf8')), 'SIGKILL'); } catch {}
    }
  }
  rmSync(state, { recursive: true, force: true });
});

async function terminalText(page) {
  return page.locator('#terminal .xterm-rows').innerText();
}

test('type in the browser terminal, reload, and the output is still there', async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  await page.goto(`http://${listening.http}/#token=${token}`);
  await page.click('#create');
  const row = page.locator('tbody#list tr').first();
  await row.locator('button.open-terminal').waitFor({ timeout: 20000 });
  await row.locator('button.open-terminal').click();
  await page.locator('#terminal .xterm-rows').waitFor();
  await waitFor('connected', async () => (await page.locator('#terminal-status').innerText()) === 'connected');

  const marker = 'browser' + Math.floor(Math.random() * 1e9);
  await page.locator('#terminal').click();
  await page.keyboard.type(`echo ${marker}-$((40+2))`);
  await page.keyboard.press('Enter');
  await waitFor('echo', async () => (await terminalText(page)).includes(`${marker}-42`));

  await page.reload();
  await page.locator('tbody#list tr button.open-terminal').first().click();
  await waitFor('output after reload', async () => (await terminalText(page)).includes(`${marker}-42`));
  // Same session: typing still works and the old line is still on screen.
  await page.locator('#terminal').click();
  await page.keyboard.type('echo again-$((1+1))');
  await page.keyboard.press('Enter');
  await waitFor('second echo', async () => (await terminalText(page)).includes('again-2'));
  assert.ok((await terminalText(page)).includes(`${marker}-42`));
  if (process.env.SCREENSHOT_DIR) await page.screenshot({ path: join(process.env.SCREENSHOT_DIR, 'terminal.png') });
  assert.deepEqual(errors, []);
});

test('a network blip (the hub restarts) reconnects by itself and loses no output', async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  await page.goto(`http://${listening.http}/#token=${token}`);
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
  await startHub(http, quic);

  await waitFor('tick12 after the blip', async () => /^tick12$/m.test(await terminalText(page)), 30000);
  await waitFor('connected again', async () => (await page.locator('#terminal-status').innerText()) === 'connected');
  const ticks = (await terminalText(page)).split('\n').map(l => l.trim()).filter(l => /^tick\d+$/.test(l));
  assert.deepEqual(ticks, Array.from({ length: 12 }, (_, i) => `tick${i + 1}`), 'every line once, in order');
  assert.deepEqual(errors, []);
});
