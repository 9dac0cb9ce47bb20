// A host app embeds the hub (Debian's Chromium driven by playwright-core): its backend, on
// its own origin, uses a service token to create a workspace for its user `user-7` and
// mints browser tokens; its page frames the embeddable terminal, where typing works, and
// calls exec from the browser. The browser tokens open nothing else.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { mkdtempSync, readFileSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, waitFor, startHub, launchBrowser, killAgents } from './lib.js';

let state, hub, browser, hostApp, hostOrigin, hubUrl;

// The host app's backend: it talks to the hub server to server with its service token.
async function hubApi(token, method, path, body, owner) {
  const headers = { Authorization: 'Bearer ' + token, 'Content-Type': 'application/json' };
  if (owner) headers['X-Wsh-Owner'] = owner;
  const res = await fetch(hubUrl + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const data = await res.json();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(data)}`);
  return data;
}

before(async () => {
  assert.ok(existsSync(bin('workspace-hub')), 'build the workspace first (cargo build --workspace --bins)');
  state = mkdtempSync(join(tmpdir(), 'wsh-embed-'));
  // The host app listens first, so the hub's config can name its origin.
  hostApp = createServer();
  await new Promise(r => hostApp.listen(0, '127.0.0.1', r));
  hostOrigin = `http://localhost:${hostApp.address().port}`;
  const config = join(state, 'hub.toml');
  writeFileSync(config, `admins = ["dev"]\n[embed]\nallowed_origins = ["${hostOrigin}"]\n`);
  let listening;
  ({ child: hub, listening } = await startHub(join(state, 'hub'), { config }));
  hubUrl = `http://${listening.http}`;
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (hostApp) hostApp.close();
  if (hub) hub.kill('SIGKILL');
  killAgents(join(state, 'hub'));
  rmSync(state, { recursive: true, force: true });
});

test('a host app embeds the terminal of a workspace it created for its user, and its browser tokens open nothing else', async () => {
  // An admin (the dev user) creates the host app's service token once.
  const admin = readFileSync(join(state, 'hub', 'dev-token'), 'utf8').trim();
  const service = (await hubApi(admin, 'POST', '/tokens', {
    name: 'host app',
    service: { owner_prefix: 'user-', scopes: ['workspaces', 'terminal', 'exec', 'tickets'] },
  })).token;

  // The backend: a workspace for user-7 (and one for user-8, to probe with), then tokens.
  const ws = await hubApi(service, 'POST', '/workspaces', {}, 'user-7');
  assert.equal(ws.owner_id, 'user-7');
  const other = await hubApi(service, 'POST', '/workspaces', {}, 'user-8');
  await waitFor('workspace ready', async () => {
    const w = await hubApi(service, 'GET', '/workspaces/' + ws.id, null, 'user-7');
    return w.status === 'READY' && w.agent;
  }, 30000);
  const mint = async purpose => (await hubApi(service, 'POST', `/workspaces/${ws.id}/tickets`,
    { purpose, expires_in_secs: 600 }, 'user-7')).ticket;
  const terminal = await mint('terminal');
  const exec = await mint('exec');

  hostApp.on('request', (req, res) => {
    res.setHeader('content-type', 'text/html');
    res.end(`<!doctype html><html><body>
<h1>Host app</h1>
<iframe id="ide" style="width: 900px; height: 420px" src="${hubUrl}/embed/terminal/${ws.id}#ticket=${terminal}"></iframe>
<script>
const hub = ${JSON.stringify(hubUrl)}, id = ${JSON.stringify(ws.id)}, other = ${JSON.stringify(other.id)};
const terminal = ${JSON.stringify(terminal)}, exec = ${JSON.stringify(exec)};
window.results = {};
async function probe(name, path, token, init = {}) {
  try {
    const res = await fetch(hub + path, { ...init, headers: { ...(init.headers || {}), Authorization: 'Bearer ' + token } });
    results[name] = res.status + ' ' + await res.text();
  } catch (e) { results[name] = 'blocked'; }
}
const run = { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ argv: ['sh', '-c', 'echo from-host-$((2*21))'] }) };
(async () => {
  await probe('exec', '/workspaces/' + id + '/exec', exec, run);
  await probe('exec_with_terminal_token', '/workspaces/' + id + '/exec', terminal, run);
  await probe('exec_on_other_workspace', '/workspaces/' + other + '/exec', exec, run);
  await probe('list', '/workspaces', exec);
  await probe('workspace', '/workspaces/' + id, exec);
  await probe('files', '/workspaces/' + id + '/files', exec);
  results.other_terminal = await new Promise(done => {
    const ws = new WebSocket(hub.replace('http', 'ws') + '/workspaces/' + other + '/terminal?ticket=' + terminal);
    ws.onopen = () => done('opened');
    ws.onerror = () => done('refused');
  });
  results.done = true;
})();
</script></body></html>`);
  });

  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(e.message));
  await page.goto(hostOrigin + '/');
  const frame = page.frameLocator('#ide');
  // The iframe is another site's document: its errors reach only its console.
  page.on('console', m => { if (m.type() === 'error' && !/status of 40[13]|CORS|ERR_FAILED|WebSocket/.test(m.text())) errors.push(m.text()); });
  await waitFor('embedded terminal connected', async () =>
    (await frame.locator('#terminal-status').innerText()) === 'connected');
  await frame.locator('#terminal').click();
  await page.keyboard.type('echo embedded-$((6*7))');
  await page.keyboard.press('Enter');
  await waitFor('typed command ran', async () =>
    (await frame.locator('#terminal .xterm-rows').innerText()).includes('embedded-42'));

  const results = await waitFor('probes', () => page.evaluate(() => window.results.done && window.results));
  // The exec token runs a command from the host app's origin (CORS allows it).
  assert.match(results.exec, /^200 /, results.exec);
  const events = results.exec.slice(4).trim().split('\n').map(l => JSON.parse(l));
  const out = events.filter(e => e.type === 'stdout').map(e => atob(e.data)).join('');
  assert.equal(out, 'from-host-42\n');
  assert.equal(events.at(-1).type, 'exit');
  assert.equal(events.at(-1).code, 0);
  // Nothing else opens: another purpose, another workspace, routes outside exec and files
  // (not even readable from this origin), another workspace's terminal.
  assert.match(results.exec_with_terminal_token, /^401 /);
  assert.match(results.exec_on_other_workspace, /^401 /);
  assert.equal(results.list, 'blocked');
  assert.equal(results.workspace, 'blocked');
  assert.match(results.files, /^401 /);
  assert.equal(results.other_terminal, 'refused');
  if (process.env.SCREENSHOT_DIR) await page.screenshot({ path: join(process.env.SCREENSHOT_DIR, 'embed.png') });
  assert.deepEqual(errors, []);
});
