// Opens one page in Debian's headless Chromium (no browser download: playwright-core only
// drives it), waits until the page sets window.__done (or __error), lets its requests finish,
// and prints what happened as one JSON line: {done, error, console, failed}.
// Usage: node drive.mjs URL [TIMEOUT_MS]
import { chromium } from 'playwright-core'

const [url, timeout = '30000'] = process.argv.slice(2)
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // Without the background-networking flags Chromium keeps calling Google's hosts, which a
  // closed network refuses. playwright-core starts it with a fresh profile of its own.
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
})
const out = { done: false, error: null, console: [], failed: [] }
try {
  const page = await browser.newPage()
  page.on('console', (msg) => out.console.push(`${msg.type()}: ${msg.text()}`))
  page.on('pageerror', (err) => out.console.push(`pageerror: ${err.message}`))
  page.on('requestfailed', (req) =>
    out.failed.push(`${req.method()} ${req.url()}: ${req.failure()?.errorText}`))
  await page.goto(url)
  await page.waitForFunction(() => window.__done || window.__error, null,
    { timeout: Number(timeout) })
  await page.waitForLoadState('networkidle')
  out.done = await page.evaluate(() => Boolean(window.__done))
  out.error = await page.evaluate(() => window.__error || null)
} catch (err) {
  out.error = String(err)
} finally {
  await browser.close()
}
console.log(JSON.stringify(out))
