// Shared by the browser tests: start a real hub (dev mode) and Debian's Chromium.
import { spawn } from 'node:child_process';
import { readFileSync, existsSync, readdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

export const root = resolve(import.meta.dirname, '../..');
export const bin = name => join(root, 'target/debug', name);

export async function waitFor(what, fn, ms = 20000) {
  const start = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - start > ms) throw new Error('timed out waiting for ' + what);
    await new Promise(r => setTimeout(r, 50));
  }
}

// Resolves with the first line of a child's stdout that matches `re`.
function lineMatching(child, re) {
  return new Promise((ok, fail) => {
    const lines = createInterface({ input: child.stdout });
    lines.on('line', line => { const m = line.match(re); if (m) ok(m); });
    child.once('exit', code => fail(new Error('exited early with ' + code)));
  });
}

// `workspace-hub dev` on a state folder; resolves with the process, its addresses and the
// one-time sign-in link it printed.
export async function startHub(state, { http = '127.0.0.1:0', quic = '127.0.0.1:0', config, provider } = {}) {
  rmSync(join(state, 'hub.json'), { force: true });
  const args = ['dev', '--state-dir', state, '--http', http, '--quic', quic];
  if (config) args.push('--config', config);
  if (provider) args.push('--provider', provider);
  const child = spawn(bin('workspace-hub'), args, {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, RUST_LOG: 'warn' },
  });
  const [, link] = await lineMatching(child, /web UI\s+(\S+)/);
  const listening = await waitFor('hub.json', () => {
    try { return JSON.parse(readFileSync(join(state, 'hub.json'), 'utf8')); } catch { return null; }
  });
  return { child, listening, link };
}

// The test OpenID Connect issuer (harness/src/bin/test-issuer.rs).
export async function startIssuer(clientId, secret) {
  const child = spawn(bin('test-issuer'), [clientId, secret], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [line] = await lineMatching(child, /^\{.*\}$/);
  return { child, url: JSON.parse(line).url };
}

export function launchBrowser() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
}

// Agents outlive the hub by design (like VMs); end them with the test.
export function killAgents(state) {
  const dir = join(state, 'workspaces');
  if (!existsSync(dir)) return;
  for (const ws of readdirSync(dir)) {
    try { process.kill(-Number(readFileSync(join(dir, ws, 'agent.pid'), 'utf8')), 'SIGKILL'); } catch {}
  }
}

export async function terminalText(page) {
  // xterm.js stops rendering while the terminal is out of view: scroll it in, as a user would.
  await page.locator('#terminal').scrollIntoViewIfNeeded();
  return page.locator('#terminal .xterm-rows').innerText();
}

// Opens the first workspace's terminal, runs `command` and waits for `expect` on screen.
export async function runInTerminal(page, command, expect) {
  await page.locator('#terminal').click();
  await page.keyboard.type(command);
  await page.keyboard.press('Enter');
  await waitFor(expect, async () => (await terminalText(page)).includes(expect));
}
