// Sign in through an OpenID Connect issuer (the test issuer: its own keys, discovery and
// JWKS on 127.0.0.1) in a real browser, then open a terminal with the session cookie.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { waitFor, startHub, startIssuer, launchBrowser, killAgents, runInTerminal } from './lib.js';

let state, hub, issuer, browser, listening;

before(async () => {
  state = mkdtempSync(join(tmpdir(), 'wsh-signin-'));
  issuer = await startIssuer('browser-client', 'browser-secret');
  const config = join(state, 'hub.toml');
  writeFileSync(config, `[oidc]\nissuer = "${issuer.url}"\nclient_id = "browser-client"\nclient_secret = "browser-secret"\n`);
  ({ child: hub, listening } = await startHub(state, { config }));
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (hub) hub.kill('SIGKILL');
  if (issuer) issuer.child.kill('SIGKILL');
  killAgents(state);
  rmSync(state, { recursive: true, force: true });
});

test('sign in through the identity provider and open a terminal', async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  await page.goto(`http://${listening.http}/`);
  await page.locator('#sign-in').click();
  await waitFor('signed in', async () => (await page.locator('#whoami').innerText()) === 'user@example.com');
  const cookies = await page.context().cookies();
  const session = cookies.find(c => c.name === 'wsh_session');
  assert.ok(session && session.httpOnly && session.sameSite === 'Lax', JSON.stringify(cookies));
  assert.equal(await page.evaluate(() => document.cookie.includes('wsh_session')), false, 'HttpOnly');

  await page.click('#create');
  const row = page.locator('tbody#list tr').first();
  await row.locator('button.open-terminal').waitFor({ timeout: 20000 });
  await row.locator('button.open-terminal').click();
  await waitFor('connected', async () => (await page.locator('#terminal-status').innerText()) === 'connected');
  await runInTerminal(page, 'echo signed-in-$((6*7))', 'signed-in-42');

  // Signing out ends the session: the API refuses the old cookie.
  await page.locator('#sign-out').click();
  await waitFor('signed out', async () => page.locator('#sign-in').isVisible());
  const res = await page.evaluate(async () => (await fetch('/workspaces')).status);
  assert.equal(res, 401);
  assert.deepEqual(errors, []);
});
