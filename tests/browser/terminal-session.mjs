// Drives Debian's headless Chromium through a terminal session on the bridge's proxy: loads
// the bridge's own terminal page (xterm.js compiled into the bridge, ttyd protocol), types
// TYPE, waits until EXPECT shows on the rendered page, types `exit 3`, and prints the final
// screen text and close status as JSON.
//
// env: PAGE_URL (https://…/terminal/#deviceId=…&token=…), SERVER_CERT (PEM; its key is pinned
// so Chromium trusts exactly the bridge's certificate), TYPE, EXPECT.
import { chromium } from 'playwright-core';
import { X509Certificate, createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

const need = (k) => { if (!process.env[k]) throw new Error(`${k} not set`); return process.env[k]; };
const [pageUrl, certPath, type, expect] = ['PAGE_URL', 'SERVER_CERT', 'TYPE', 'EXPECT'].map(need);

const spki = new X509Certificate(readFileSync(certPath)).publicKey.export({ type: 'spki', format: 'der' });
const pin = createHash('sha256').update(spki).digest('base64');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--ignore-certificate-errors-spki-list=${pin}`],
});
const screen = (page) => page.evaluate(() => document.querySelector('.xterm-rows')?.innerText ?? '');
let result;
try {
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(`console: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(pageUrl);
  try {
    await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('open'), null, { timeout: 15000 });
    await page.click('#terminal');
    await page.keyboard.type(type);
    await page.keyboard.press('Enter');
    await page.waitForFunction((e) => document.querySelector('.xterm-rows')?.innerText.includes(e), expect, { timeout: 15000 });
    const shown = await screen(page);
    await page.keyboard.type('exit 3');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('closed'), null, { timeout: 15000 });
    result = { ok: true, screen: shown, status: await page.textContent('#status') };
  } catch (e) {
    result = { ok: false, error: String(e), screen: await screen(page), status: await page.textContent('#status'), logs };
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
