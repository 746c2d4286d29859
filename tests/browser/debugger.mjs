// Drives relay's /debugger page in Debian's headless Chromium (playwright-core only drives it;
// no browser download) for tests/system/test_debugger.py, one command at a time.
//
// Reads one JSON command a line on stdin: {"id": 1, "op": "open", "args": {...}}; answers one
// JSON line on stdout: {"id": 1, "ok": true, "result": ...} or {"id": 1, "ok": false, "error"}.
// Commands run concurrently (a wait can be pending while the test sends events); every page
// request, console message, page error and CSP violation is recorded from the start.
import { createInterface } from 'node:readline'
import { chromium } from 'playwright-core'

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // Without the background-networking flags Chromium keeps calling Google's hosts, which a
  // closed network refuses. playwright-core starts it with a fresh profile of its own.
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
})
const context = await browser.newContext({ viewport: { width: 1440, height: 900 },
  deviceScaleFactor: 1 })
const page = await context.newPage()
const seen = { requests: [], console: [], errors: [], failed: [] }
page.on('request', (req) => seen.requests.push({
  url: req.url(), method: req.method(), authorization: req.headers().authorization || null,
}))
page.on('console', (msg) => seen.console.push({ type: msg.type(), text: msg.text() }))
page.on('pageerror', (err) => seen.errors.push(`pageerror: ${err.message}`))
page.on('requestfailed', (req) => {
  const why = req.failure()?.errorText || ''
  // The stream is aborted on purpose when the page reconnects or closes.
  if (!why.includes('ERR_ABORTED')) seen.failed.push(`${req.method()} ${req.url()}: ${why}`)
})
// Playwright's init scripts are not subject to the page's CSP: this listener sees every
// violation, the console message aside.
await context.addInitScript(() => {
  window.__csp = []
  document.addEventListener('securitypolicyviolation', (e) => {
    window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`)
  })
})

const row = (messageId) => `#message-rows tr[data-message-id="${messageId}"]`

const ops = {
  /** Opens `url` and waits until the page's script has run (the status shows a state). */
  async open ({ url }) {
    await page.goto(url)
    await page.waitForFunction(() => document.body.dataset.view !== undefined)
    return { url: page.url() }
  },

  /** Enters `token` in the token form, then waits until the form is gone and the stream is
   * live, or the form asks again; what the page shows then. */
  async login ({ token, timeout = 5000 }) {
    await page.waitForSelector('#auth:not([hidden])', { timeout })
    await page.fill('#auth-token', token)
    await page.click('#auth-submit')
    await page.waitForFunction(() => {
      const state = document.getElementById('status').dataset.state
      return state === 'live' || state === 'unauthorized'
    }, null, { timeout })
    return ops.auth()
  },

  /** The token form and the connection status as the page shows them. */
  async auth () {
    return page.evaluate(() => ({
      form_shown: !document.getElementById('auth').hidden,
      error: document.getElementById('auth-error').hidden ? null
        : document.getElementById('auth-error').textContent,
      status: document.getElementById('status').dataset.state,
    }))
  },

  /** Reloads the page (same tab: session storage kept). */
  async reload () {
    await page.reload()
    await page.waitForFunction(() => document.body.dataset.view !== undefined)
    return ops.auth()
  },

  /** Waits for the live list's row of `message_id`; when it appeared (ms since the epoch, taken
   * here, so never earlier than the page showed it) and what its cells say. */
  async wait_row ({ message_id: messageId, timeout = 10000 }) {
    const handle = await page.waitForSelector(row(messageId), { state: 'attached', timeout })
    const seenAt = Date.now()
    const cells = await handle.evaluate((tr) => ({
      outcome: tr.dataset.outcome,
      type: tr.dataset.type,
      user: tr.dataset.user,
      time: tr.querySelector('.col-time').textContent,
      event: tr.querySelector('.col-event').textContent,
      rule: tr.querySelector('.col-rule').textContent,
      drop_rule: tr.querySelector('.col-rule').dataset.rule || null,
      changed_by: tr.querySelector('.col-rule').dataset.changedBy || null,
      visible: !tr.hidden,
    }))
    return { seen_at: seenAt, ...cells }
  },

  /** Clicks the row of `message_id`; the detail pane as shown: the outcome, the drop rule and
   * reason, the rules that changed it with their paths, the marked paths of each side, and the
   * delivery to each upstream (waiting until `upstream` shows `delivery` when given). */
  async detail ({ message_id: messageId, upstream, delivery, timeout = 10000 }) {
    await page.click(row(messageId))
    await page.waitForSelector(`#detail:not([hidden])[data-message-id="${messageId}"]`,
      { timeout })
    if (upstream) {
      await page.waitForSelector(
        `#detail-deliveries tr[data-upstream="${upstream}"][data-outcome="${delivery}"]`,
        { timeout })
    }
    return page.evaluate(() => {
      const $ = (id) => document.getElementById(id)
      const marked = (id) => [...$(id).querySelectorAll('.changed')].map((node) => ({
        path: node.dataset.path, rules: node.dataset.rule.split(' '), text: node.textContent,
      }))
      return {
        outcome: $('detail').dataset.outcome,
        summary: $('detail-outcome').textContent,
        rule: $('detail-rule')?.textContent ?? null,
        reason: $('detail-reason')?.textContent ?? null,
        changes: [...$('detail-changes').querySelectorAll('li[data-rule]')].map((li) => ({
          rule: li.dataset.rule,
          paths: [...li.querySelectorAll('[data-path]')].map((p) => p.dataset.path),
        })),
        before_marked: marked('detail-before'),
        after_marked: marked('detail-after'),
        before: $('detail-before').textContent,
        after: $('detail-after').textContent,
        deliveries: [...$('detail-deliveries').querySelectorAll('tr')].map((tr) => ({
          upstream: tr.dataset.upstream, outcome: tr.dataset.outcome,
          status: tr.children[2].textContent,
        })),
      }
    })
  },

  /** Shows the `view` tab (live, users, queues) and waits until `selector` is there. */
  async view ({ view, selector, timeout = 10000 }) {
    await page.click(`#tab-${view}`)
    if (selector) await page.waitForSelector(selector, { state: 'attached', timeout })
    return ops.read_view({ view })
  },

  /** What the users or queues view shows. */
  async read_view ({ view }) {
    return page.evaluate((name) => {
      const rows = (sel) => [...document.querySelectorAll(sel)]
      if (name === 'users') {
        return {
          multi: rows('#multi-group-users tbody tr').map((tr) => ({
            user: tr.dataset.user,
            groups: [...tr.querySelectorAll('.chip-group')].map((c) => c.textContent),
          })),
          internal: rows('#internal-users tbody tr').map((tr) => ({
            user: tr.dataset.user, reason: tr.children[1].textContent,
          })),
          counters: Object.fromEntries(rows('#rule-counters tbody tr').map((tr) =>
            [tr.dataset.counter, Number(tr.children[2].textContent)])),
          chart: rows('#groups-chart g[data-groups]').map((g) => ({
            groups: Number(g.dataset.groups), users: Number(g.dataset.users),
          })),
        }
      }
      if (name === 'queues') {
        return rows('#queue-rows tr[data-upstream]').map((tr) => ({
          upstream: tr.dataset.upstream, paused: tr.dataset.paused === 'true',
          messages: Number(tr.dataset.messages), dead_letters: Number(tr.dataset.deadLetters),
          age: tr.querySelector('.col-age').textContent,
        }))
      }
      return null
    }, view)
  },

  async click ({ selector }) {
    await page.click(selector)
    return {}
  },

  /** Waits until `selector`'s text holds `text`; that text. */
  async wait_text ({ selector, text, timeout = 10000 }) {
    await page.waitForFunction(([sel, want]) =>
      document.querySelector(sel)?.textContent.includes(want), [selector, text], { timeout })
    return page.textContent(selector)
  },

  async count ({ selector }) {
    return page.locator(selector).count()
  },

  /** Types `text` in the search box; the message ids of the rows still shown. */
  async search ({ text }) {
    await page.fill('#search', text)
    return page.evaluate(() => [...document.querySelectorAll('#message-rows tr[data-message-id]')]
      .filter((tr) => !tr.hidden).map((tr) => tr.dataset.messageId))
  },

  /** Where the page keeps the token: session and local storage, and the page's own URL. */
  async storage () {
    return page.evaluate(() => ({
      session: Object.fromEntries(Object.entries(sessionStorage)),
      local: Object.fromEntries(Object.entries(localStorage)),
      url: location.href,
      cookie: document.cookie,
    }))
  },

  /** Every request, console message, page error, failed request and CSP violation so far. */
  async seen () {
    const csp = await page.evaluate(() => window.__csp || [])
    return { ...seen, csp }
  },

  /** A PNG of the whole window at `path`. */
  async screenshot ({ path }) {
    await page.screenshot({ path })
    return { path }
  },

}

const lines = createInterface({ input: process.stdin })
const answer = (reply) => process.stdout.write(`${JSON.stringify(reply)}\n`)
for await (const line of lines) {
  if (!line.trim()) continue
  const { id, op, args = {} } = JSON.parse(line)
  if (op === 'close') {
    await browser.close().catch(() => {})
    answer({ id, ok: true, result: {} })
    process.exit(0)
  }
  const run = ops[op]
  if (!run) {
    answer({ id, ok: false, error: `no such op: ${op}` })
    continue
  }
  run(args).then(
    (result) => answer({ id, ok: true, result }),
    (err) => answer({ id, ok: false, error: String(err && err.stack ? err.stack : err) }),
  )
}
await browser.close().catch(() => {}) // stdin closed without a close command
process.exit(0)
