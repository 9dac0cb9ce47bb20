// The dashboard's workspace actions in a real browser: create a named workspace from a
// repository-less form, stop it, start it, delete it (confirming), with a screenshot of
// each view when SCREENSHOT_DIR is set.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, existsSync, rmSync, mkdirSync, writeFileSync, readFileSync } from 'node:fs';
import { execFileSync, spawn } from 'node:child_process';
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
  const requests = [];
  page.on('request', r => requests.push(r.url()));
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

  // A change made elsewhere (the API, not a dashboard button) shows without a reload: the
  // list follows the owner's event stream (its safety-net poll is every 30 s).
  assert.ok(requests.some(u => new URL(u).pathname === '/events'), 'the list follows GET /events');
  const id = (await row.innerText()).match(/demo · ([0-9a-f-]{36})/)[1];
  await page.evaluate(async id => {
    const s = await (await fetch('/session')).json();
    await fetch('/workspaces/' + id + '/stop', { method: 'POST', headers: { 'X-CSRF-Token': s.csrf_token } });
  }, id);
  await waitFor('stopped elsewhere, shown', async () => /SUSPENDED/.test(await row.innerText()), 10000);
  await row.locator('button.start').click();
  await row.locator('button.stop').waitFor({ timeout: 20000 });

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
  // Created with an idle policy of its own: 15 minutes (the hub's default is 30).
  await page.fill('#new-name', 'tools');
  await page.selectOption('#new-idle', '900');
  await page.click('#create');
  const row = page.locator('tbody#list tr', { hasText: 'tools' });
  await row.locator('button.open-terminal').waitFor({ timeout: 20000 });
  const stopIn = await page.evaluate(async id => {
    const s = await (await fetch(`/workspaces/${id}/status`)).json();
    return new Date(s.activity.stop_at).getTime() - Date.now();
  }, await row.getAttribute('data-id'));
  assert.ok(stopIn <= 15 * 60 * 1000 + 10000, `the workspace's own idle policy (stops in ${stopIn} ms)`);
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
  // The session list names it; opening it from there attaches to it.
  const sessionRow = page.locator('#sessions tr[data-session="main"]');
  await sessionRow.waitFor({ timeout: 10000 });
  assert.match(await sessionRow.innerText(), /running/);
  await page.locator('#sessions button.open-session').first().click();
  await sessionRow.locator('button.open-session').click();
  await waitFor('opened from the list', async () => (await screen()).includes('named-9'));

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

test('SSH keys, dotfiles and a dev container: the profile and setup views', async () => {
  const src = mkdtempSync(join(tmpdir(), 'wsh-dashboard-src-'));
  try {
    const git = (dir, ...args) => execFileSync('git', ['-c', 'user.name=t', '-c', 'user.email=t@example.com', ...args], { cwd: dir });
    const repo = (name, files) => {
      const dir = join(src, name);
      mkdirSync(dir, { recursive: true });
      git(dir, 'init', '-q', '-b', 'main');
      for (const [path, text] of Object.entries(files)) {
        mkdirSync(join(dir, path, '..'), { recursive: true });
        writeFileSync(join(dir, path), text);
      }
      git(dir, 'add', '-A');
      git(dir, 'commit', '-q', '-m', 'init');
      return 'file://' + dir;
    };
    const dotfiles = repo('dotfiles', { 'install.sh': 'echo ok > ../dotfiles-ran\n' });
    const port = 20000 + Math.floor(Math.random() * 20000);
    const widgets = repo('widgets', {
      '.devcontainer/devcontainer.json': `{
        // comments are fine
        "image": "mcr.microsoft.com/devcontainers/base",
        "onCreateCommand": "true",
        "postStartCommand": "exec ${bin('test-server')} ${port}",
        "portsAttributes": { "${port}": { "label": "Web app" } },
      }`,
    });
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'me@laptop', '-f', join(src, 'key')]);
    const publicKey = readFileSync(join(src, 'key.pub'), 'utf8').trim();

    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', e => errors.push(e.message));
    page.on('dialog', d => d.accept());
    await page.goto(`http://${listening.http}/`);
    await waitFor('signed in', async () => (await page.locator('#whoami').innerText()) === 'dev');

    // Keys: a bad one is refused with the hub's message, a good one listed, then removed.
    await page.fill('#new-key', 'ssh-ed25519 not-base64!');
    await page.click('#add-key');
    await waitFor('bad key refused', async () => (await page.locator('#error').innerText()).includes('bad_key'));
    await page.fill('#new-key', publicKey);
    await page.click('#add-key');
    const keyRow = page.locator('#ssh-keys tr', { hasText: 'me@laptop' });
    await keyRow.waitFor({ timeout: 10000 });
    assert.match(await keyRow.innerText(), /SHA256:/);

    // Dotfiles: saved, shown again after a reload.
    await page.fill('#dotfiles-repo', dotfiles);
    await page.click('#save-dotfiles');
    await waitFor('dotfiles saved', async () => (await page.locator('#dotfiles-status').innerText()) === 'Saved.');
    await page.reload();
    await waitFor('dotfiles shown', async () => (await page.locator('#dotfiles-repo').inputValue()) === dotfiles);
    await shot(page, 'dashboard-profile');

    // A workspace from a repository with a dev container: its setup steps and labels.
    await page.fill('#new-name', 'widgets');
    await page.fill('#new-repo', widgets);
    await page.click('#create');
    const row = page.locator('tbody#list tr', { hasText: 'widgets' });
    await row.locator('button.open-terminal').waitFor({ timeout: 20000 });
    await row.locator('button.open-terminal').click();
    const stepState = name => page.locator(`#setup-steps tr[data-step="${name}"] td:nth-child(2)`).innerText();
    await waitFor('dotfiles installed', async () => (await stepState('dotfiles')) === 'done', 20000);
    await waitFor('onCreateCommand ran', async () => (await stepState('onCreateCommand')) === 'done', 20000);
    await waitFor('the server runs', async () => (await stepState('postStartCommand')) === 'running', 20000);
    assert.match(await page.locator('#setup-checkout').innerText(), /Repository: done/);
    assert.equal(await page.locator('#setup-not-applied-box').isHidden(), false);
    await page.click('#setup-not-applied-box summary');
    assert.match(await page.locator('#setup-not-applied').innerText(), /image: no container runtime/);
    const portRow = page.locator(`#ports tr[data-port="${port}"]`);
    await waitFor('labelled port', async () => (await portRow.count()) === 1 && (await portRow.innerText()).includes('Web app'), 20000);
    await shot(page, 'dashboard-setup');

    // File sync: a running `wsh sync` shows with its counts, and goes when it ends.
    assert.equal(await page.locator('#sync-empty').isHidden(), false, 'no sync yet');
    const token = await page.evaluate(async () => {
      const s = await (await fetch('/session')).json();
      const res = await fetch('/tokens', { method: 'POST', headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf_token }, body: JSON.stringify({ name: 'sync' }) });
      return (await res.json()).token;
    });
    const notes = join(src, 'notes');
    mkdirSync(notes);
    writeFileSync(join(notes, 'todo.txt'), 'sync me\n');
    const sync = spawn(bin('wsh'), ['sync', 'widgets', notes, 'notes'], {
      env: { ...process.env, WSH_HUB: `http://${listening.http}`, WSH_TOKEN: token, XDG_CONFIG_HOME: src, XDG_STATE_HOME: src, XDG_RUNTIME_DIR: src },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let syncErr = '';
    sync.stderr.on('data', d => { syncErr += d; });
    try {
      const syncRow = page.locator('#sync-sessions tr[data-root="notes"]');
      await waitFor('the sync session shown', async () => (await syncRow.count()) === 1 && /^1 \/ 0$/m.test(await syncRow.locator('td:nth-child(4)').innerText()), 20000)
        .catch(e => { throw new Error(e.message + ': ' + syncErr); });
      assert.match(await syncRow.innerText(), /~\/notes/);
      assert.match(await syncRow.innerText(), /through the hub|direct/);
      assert.match(await syncRow.innerText(), /file events/);
      await shot(page, 'dashboard-sync');
    } finally {
      sync.kill('SIGINT');
      await new Promise(r => sync.once('exit', r));
    }
    await waitFor('the sync session gone', async () => !(await page.locator('#sync-empty').isHidden()), 20000);

    // Clearing the dotfiles and removing the key.
    await page.click('#clear-dotfiles');
    await waitFor('dotfiles cleared', async () => (await page.locator('#dotfiles-repo').inputValue()) === '');
    await keyRow.locator('button.remove-key').click();
    await waitFor('key removed', async () => (await keyRow.count()) === 0);
    assert.deepEqual(errors, []);
  } finally {
    rmSync(src, { recursive: true, force: true });
  }
});
