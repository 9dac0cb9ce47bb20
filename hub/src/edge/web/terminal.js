// The browser terminal, shared by the web UI and the embeddable page (/embed/terminal/:id).
//
// wshTerminal(host, status, id, getTicket, name) opens the workspace's terminal in `host`
// and returns { close() }. `getTicket()` resolves to a terminal ticket for each
// (re)connection. With `name`, the session by that name (created if none runs).
// The session id is remembered per workspace, so a reload (or a new tab) re-attaches to
// the same session: the agent sends the current screen first. After a network blip the
// socket reconnects with the offset of the last byte it showed, and the agent sends
// exactly the bytes after it.
function wshTerminal(host, status, id, getTicket, name) {
  // A third-party iframe may be denied storage: then the session lives as long as the page.
  let storage;
  try { storage = window.sessionStorage; storage.length; } catch (e) {
    const kept = new Map();
    storage = { getItem: k => kept.get(k) ?? null, setItem: (k, v) => kept.set(k, v), removeItem: k => kept.delete(k) };
  }
  host.replaceChildren();
  const term = new Terminal({ convertEol: false, scrollback: 5000, fontSize: 14 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(host);
  fit.fit();
  const key = 'session:' + id + (name ? ':' + name : '');
  const state = { session: name || storage.getItem(key), offset: null, closed: false, ws: null, retry: 200 };
  const encoder = new TextEncoder();

  function retryLater() {
    // Capped exponential backoff with jitter, so a hub restart is not met by every
    // browser at the same instant.
    setTimeout(connect, state.retry * (0.5 + Math.random() / 2));
    state.retry = Math.min(state.retry * 2, 5000);
  }

  async function connect() {
    if (state.closed) return;
    let ticket;
    try {
      ticket = await getTicket();
    } catch (e) {
      status.textContent = 'reconnecting…';
      retryLater();
      return;
    }
    const q = new URLSearchParams({ ticket, cols: term.cols, rows: term.rows });
    if (state.session) q.set('session', state.session);
    if (state.session && state.offset !== null) q.set('offset', state.offset);
    const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/workspaces/' + id + '/terminal?' + q);
    ws.binaryType = 'arraybuffer';
    state.ws = ws;
    ws.onopen = () => { status.textContent = 'connected'; state.retry = 200; };
    ws.onmessage = (msg) => {
      if (typeof msg.data === 'string') {
        const ev = JSON.parse(msg.data);
        if (ev.type === 'opened') { state.session = ev.session; storage.setItem(key, ev.session); }
        else if (ev.type === 'truncated') { term.write('\r\n[some output was dropped while you were away]\r\n'); }
        else if (ev.type === 'exit') { state.closed = true; storage.removeItem(key); term.write('\r\n[process exited with status ' + ev.code + ']\r\n'); status.textContent = 'exited'; }
        else if (ev.type === 'error') {
          status.textContent = ev.code + ': ' + ev.message;
          if (ev.code === 'NoSuchSession') { storage.removeItem(key); state.session = name || null; state.offset = null; ws.close(); }
        }
        return;
      }
      const view = new DataView(msg.data);
      const kind = view.getUint8(0);
      const offset = Number(view.getBigUint64(1));
      const bytes = new Uint8Array(msg.data, 9);
      if (kind === 0) { term.write(bytes); state.offset = offset + bytes.length; }
      else { term.write(bytes); if (kind === 2) state.offset = offset; }
    };
    ws.onclose = () => {
      if (state.closed) return;
      status.textContent = 'reconnecting…';
      retryLater();
    };
  }
  term.onData(data => { if (state.ws && state.ws.readyState === 1) state.ws.send(encoder.encode(data)); });
  term.onResize(({ cols, rows }) => { if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify({ type: 'resize', cols, rows })); });
  const onResize = () => fit.fit();
  window.addEventListener('resize', onResize);
  connect();
  term.focus();
  return {
    close() { state.closed = true; window.removeEventListener('resize', onResize); if (state.ws) state.ws.close(); term.dispose(); },
  };
}
