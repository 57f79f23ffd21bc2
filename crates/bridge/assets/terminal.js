// The terminal page's logic (a file of its own: the page's CSP allows no inline script).
import { Terminal } from './xterm.mjs';
const status = (s) => { document.getElementById('status').textContent = s; };
const params = new URLSearchParams(location.hash.slice(1));
const device = params.get('deviceId');
const token = params.get('token');
if (!device || !token) {
  status('open this page as /terminal/#deviceId=DEVICE&token=OPERATOR_JWT');
  throw new Error('deviceId and token missing');
}
// Drop the token from the address bar and the history once read.
history.replaceState(null, '', location.pathname);
const term = new Terminal({ cols: 100, rows: 30 });
term.open(document.getElementById('terminal'));
window.term = term;
const enc = new TextEncoder();
// Output frames may split UTF-8 sequences: decode as a stream, as ttyd's page does.
const dec = new TextDecoder();
const q = new URLSearchParams({ deviceId: device, token });
const ws = new WebSocket(`wss://${location.host}/terminal?${q}`, ['tty']);
ws.binaryType = 'arraybuffer';
ws.onopen = () => {
  // The proxy swaps the operator's token for a device ticket: AuthToken stays empty.
  ws.send(enc.encode(JSON.stringify({ AuthToken: '', columns: term.cols, rows: term.rows })));
  status(`open: ${device}`);
  term.focus();
};
ws.onmessage = (ev) => {
  const data = new Uint8Array(ev.data);
  const cmd = String.fromCharCode(data[0]);
  if (cmd === '0') term.write(dec.decode(data.subarray(1), { stream: true }));
  else if (cmd === '1') document.title = dec.decode(data.subarray(1));
};
ws.onclose = (ev) => status(`closed ${ev.code} ${ev.reason}`);
term.onData((d) => ws.readyState === 1 && ws.send(enc.encode('0' + d)));
term.onResize(({ cols, rows }) =>
  ws.readyState === 1 && ws.send(enc.encode('1' + JSON.stringify({ columns: cols, rows }))));
