// relay's debugger page: the live tap (/admin/tap), the report (/admin/report) and the queues
// (/admin/queue), read with the admin token kept in this tab's session storage.
//
// Payloads are hostile input: every value that comes from relay is put in the page as text
// (textContent, Text nodes, attribute values), never parsed as HTML.

const TOKEN_KEY = 'relay.admin.token'
const MAX_ROWS = 500 // messages kept in the list (and in the DOM)
const MAX_PENDING = 5000 // messages held while paused; beyond, the oldest held are let go
const MAX_DELIVERY_IDS = 5000 // message ids whose delivery state is remembered
const QUEUE_EVERY_MS = 2000
const BYE_RECONNECT_S = 5
const TYPES = ['track', 'identify', 'group', 'page', 'screen', 'alias']

const $ = (id) => document.getElementById(id)

/** An element with `props` (class, text, dataset-like attributes) and children (nodes or text). */
function el (tag, props = {}, ...children) {
  const node = document.createElement(tag)
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue
    if (name === 'class') node.className = value
    else if (name === 'text') node.textContent = String(value)
    else node.setAttribute(name, String(value))
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child) // strings become Text nodes
  }
  return node
}

function clear (node) {
  while (node.firstChild) node.firstChild.remove()
}

const text = (value) => (value === null || value === undefined ? '' : String(value))

// ----------------------------------------------------------------------------------------------
// Formatting

const pad = (n, width = 2) => String(n).padStart(width, '0')

function clockTime (iso) {
  const at = new Date(iso)
  if (Number.isNaN(at.getTime())) return text(iso)
  return `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}.` +
    pad(at.getMilliseconds(), 3)
}

function fullTime (iso) {
  const at = new Date(iso)
  if (Number.isNaN(at.getTime())) return text(iso)
  return `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())} ${clockTime(iso)}`
}

function bytes (n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '—'
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let value = n
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit += 1
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`
}

function duration (seconds) {
  if (typeof seconds !== 'number' || !Number.isFinite(seconds)) return '—'
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`
  const minutes = Math.floor(seconds / 60)
  if (minutes < 60) return `${minutes} min ${Math.floor(seconds % 60)} s`
  const hours = Math.floor(minutes / 60)
  if (hours < 48) return `${hours} h ${minutes % 60} min`
  return `${Math.floor(hours / 24)} d ${hours % 24} h`
}

function percent (share) {
  const value = share * 100
  return `${value >= 10 || value === 0 ? Math.round(value) : value.toFixed(1)}%`
}

// ----------------------------------------------------------------------------------------------
// The token: asked once, kept in sessionStorage, sent as a header only.

const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
}

class Unauthorized extends Error {}

function askToken (why) {
  const box = $('auth')
  const error = $('auth-error')
  error.textContent = why || ''
  error.hidden = !why
  box.hidden = false
  $('forget-token').hidden = true
  const input = $('auth-token')
  input.value = ''
  input.focus()
}

function tokenRefused () {
  token.clear()
  tap.stop()
  queues.stop()
  setStatus('unauthorized', 'Token refused')
  askToken('relay refused this token (401). Enter the admin token again.')
}

$('auth-form').addEventListener('submit', (event) => {
  event.preventDefault()
  const value = $('auth-token').value.trim()
  if (!value) return
  token.set(value)
  $('auth-token').value = ''
  $('auth-error').hidden = true
  $('auth').hidden = true
  $('forget-token').hidden = false
  start()
})

$('forget-token').addEventListener('click', () => {
  token.clear()
  tap.stop()
  queues.stop()
  setStatus('idle', 'Not connected')
  askToken('')
})

/** GET `path` with the token; the parsed JSON. Throws Unauthorized on a 401 (after asking for
 * the token again), an Error with relay's message otherwise. */
async function getJson (path) {
  const current = token.get()
  if (!current) throw new Unauthorized('no token')
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${current}`, Accept: 'application/json' },
    cache: 'no-store',
  })
  if (response.status === 401) {
    tokenRefused()
    throw new Unauthorized('token refused')
  }
  if (response.status === 404) {
    throw new Error('the admin endpoints are off (admin.token is empty in relay\'s config)')
  }
  let body = null
  try {
    body = await response.json()
  } catch {
    body = null
  }
  if (!response.ok) {
    const why = body && typeof body.message === 'string' ? body.message : response.statusText
    throw new Error(`relay answered ${response.status}: ${why}`)
  }
  return body
}

// ----------------------------------------------------------------------------------------------
// Connection status

function setStatus (state, label) {
  const status = $('status')
  status.dataset.state = state
  status.textContent = label
}

// ----------------------------------------------------------------------------------------------
// Server-Sent Events over fetch (EventSource cannot send the Authorization header).

class SseParser {
  constructor (onEvent) {
    this.onEvent = onEvent
    this.buffer = ''
    this.event = ''
    this.data = []
    this.lastId = ''
  }

  push (chunk) {
    this.buffer += chunk
    // A chunk ending in \r may be the first half of \r\n: keep it for the next one.
    const held = this.buffer.endsWith('\r') ? 1 : 0
    const usable = this.buffer.slice(0, this.buffer.length - held)
    const lines = usable.split(/\r\n|\r|\n/)
    this.buffer = lines.pop() + (held ? '\r' : '')
    for (const line of lines) this.line(line)
  }

  line (line) {
    if (line === '') {
      if (this.data.length) this.onEvent(this.event || 'message', this.data.join('\n'), this.lastId)
      this.event = ''
      this.data = []
      return
    }
    if (line.startsWith(':')) return // a comment: relay's keepalive
    const colon = line.indexOf(':')
    const field = colon < 0 ? line : line.slice(0, colon)
    let value = colon < 0 ? '' : line.slice(colon + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    if (field === 'event') this.event = value
    else if (field === 'data') this.data.push(value)
    else if (field === 'id' && !value.includes('\0')) this.lastId = value
  }
}

class Tap {
  constructor () {
    this.params = new URLSearchParams()
    this.controller = null
    this.generation = 0
    this.retryTimer = null
    this.retryDelay = 1
    this.byeReason = null
  }

  /** (Re)connects with the current filters. */
  start () {
    this.stop()
    const generation = ++this.generation
    this.run(generation)
  }

  stop () {
    this.generation += 1
    if (this.controller) this.controller.abort()
    this.controller = null
    clearTimeout(this.retryTimer)
    this.retryTimer = null
  }

  async run (generation) {
    const current = token.get()
    if (!current) return askToken('')
    const controller = new AbortController()
    this.controller = controller
    this.byeReason = null
    hideBye()
    setStatus('connecting', 'Connecting…')
    const query = this.params.toString()
    let response
    try {
      response = await fetch(`/admin/tap${query ? `?${query}` : ''}`, {
        headers: { Authorization: `Bearer ${current}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: controller.signal,
      })
    } catch {
      if (generation === this.generation) this.retry('relay does not answer')
      return
    }
    if (generation !== this.generation) return
    if (response.status === 401) return tokenRefused()
    if (response.status === 404) {
      return setStatus('off', 'Admin endpoints off (admin.token is empty)')
    }
    if (!response.ok || !response.body) {
      const why = await refusal(response)
      if (response.status === 400) return setStatus('closed', `Filters refused: ${why}`)
      return this.retry(why)
    }
    this.retryDelay = 1
    setStatus('live', 'Live')
    live.connected()
    const reader = response.body.getReader()
    const decoder = new TextDecoder()
    const parser = new SseParser((name, data) => {
      if (generation === this.generation) this.dispatch(name, data)
    })
    try {
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        parser.push(decoder.decode(value, { stream: true }))
      }
      parser.push(decoder.decode())
    } catch {
      // aborted by stop(), or the connection broke: told apart below
    }
    if (generation !== this.generation) return
    if (this.byeReason !== null) return this.afterBye()
    this.retry('the stream ended')
  }

  dispatch (name, data) {
    let body
    try {
      body = JSON.parse(data)
    } catch {
      return // not ours to show; the next event is independent
    }
    if (body === null || typeof body !== 'object') return
    if (name === 'message') live.addMessage(body)
    else if (name === 'delivery') live.addDelivery(body)
    else if (name === 'refused') live.addRefused(body)
    else if (name === 'sampling') showSampling(body)
    else if (name === 'bye') this.byeReason = text(body.reason) || 'no reason given'
  }

  retry (why) {
    const seconds = this.retryDelay
    this.retryDelay = Math.min(this.retryDelay * 2, 15)
    setStatus('reconnecting', `Disconnected (${why}); retrying in ${seconds} s`)
    clearTimeout(this.retryTimer)
    this.retryTimer = setTimeout(() => this.start(), seconds * 1000)
  }

  afterBye () {
    setStatus('closed', 'Closed by relay')
    let left = BYE_RECONNECT_S
    const tick = () => {
      $('bye-text').textContent =
        `relay closed the stream: ${this.byeReason}. Reconnecting in ${left} s.`
      $('bye').hidden = false
      if (left <= 0) return this.start()
      left -= 1
      this.retryTimer = setTimeout(tick, 1000)
    }
    tick()
  }
}

/** relay's reason for an answer that is not the stream: its JSON message, else the status. */
async function refusal (response) {
  try {
    const body = await response.json()
    if (body && typeof body.message === 'string') return `${response.status}: ${body.message}`
  } catch {
    // not JSON: the status says enough
  }
  return `relay answered ${response.status}`
}

function hideBye () {
  $('bye').hidden = true
}

$('reconnect').addEventListener('click', () => tap.start())

function showSampling (body) {
  const share = typeof body.share === 'number' ? body.share : 1
  const banner = $('sampling')
  banner.dataset.share = String(share)
  if (share >= 1) {
    banner.hidden = true
    banner.textContent = ''
    return
  }
  const rate = typeof body.rate === 'number' ? ` — relay receives about ${Math.round(body.rate)}` +
    ' messages/s, more than can be read here' : ''
  banner.textContent = `Sampling: showing ${percent(share)} of messages${rate}.`
  banner.hidden = false
}

// ----------------------------------------------------------------------------------------------
// The live list

const live = {
  entries: [], // shown, oldest first: {key, kind, rec, tr, haystack}
  byKey: new Map(),
  pending: [], // arrived while paused
  pendingKeys: new Set(),
  letGo: 0, // held while paused but let go (over MAX_PENDING)
  incoming: [], // arrived, not yet drawn
  flushTimer: null,
  paused: false,
  deliveries: new Map(), // message_id -> Map(upstream -> delivery)
  selected: null,
  query: '',
  counts: { message: 0, forwarded: 0, dropped: 0, invalid: 0, refused: 0 },

  connected () {
    $('empty').textContent = 'Connected. Waiting for messages… Send an event to relay and it ' +
      'shows up here.'
  },

  addMessage (rec) {
    this.counts.message += 1
    if (['forwarded', 'dropped', 'invalid'].includes(rec.outcome)) this.counts[rec.outcome] += 1
    this.arrive({ key: `m:${text(rec.seq)}:${text(rec.message_id)}`, kind: 'message', rec })
  },

  addRefused (rec) {
    this.counts.refused += 1
    this.arrive({ key: `r:${text(rec.seq)}:${text(rec.at)}`, kind: 'refused', rec })
  },

  arrive (entry) {
    if (this.byKey.has(entry.key) || this.pendingKeys.has(entry.key)) return // replayed again
    if (this.paused) {
      this.pending.push(entry)
      this.pendingKeys.add(entry.key)
      if (this.pending.length > MAX_PENDING) {
        this.pendingKeys.delete(this.pending.shift().key)
        this.letGo += 1
      }
      this.showPending()
    } else {
      this.incoming.push(entry)
      if (this.incoming.length > MAX_ROWS) this.incoming.shift()
      if (this.flushTimer === null) this.flushTimer = setTimeout(() => this.flush(), 30)
    }
    this.showCounts()
  },

  flush () {
    this.flushTimer = null
    const batch = this.incoming
    this.incoming = []
    if (!batch.length) return
    const rows = []
    for (const entry of batch) { // oldest first, as they arrived
      if (this.byKey.has(entry.key)) continue
      entry.tr = entry.kind === 'message' ? messageRow(entry.rec) : refusedRow(entry.rec)
      entry.tr.hidden = !this.matches(entry)
      this.entries.push(entry)
      this.byKey.set(entry.key, entry)
      rows.push(entry.tr)
    }
    $('message-rows').prepend(...rows.reverse()) // the newest on top
    while (this.entries.length > MAX_ROWS) {
      const old = this.entries.shift()
      this.byKey.delete(old.key)
      old.tr.remove()
      if (this.selected === old.key) closeDetail()
    }
    $('empty').hidden = this.entries.length > 0
    this.showCounts()
  },

  addDelivery (rec) {
    const id = text(rec.message_id)
    if (!id) return
    let upstreams = this.deliveries.get(id)
    if (!upstreams) {
      upstreams = new Map()
      this.deliveries.set(id, upstreams)
      if (this.deliveries.size > MAX_DELIVERY_IDS) {
        this.deliveries.delete(this.deliveries.keys().next().value)
      }
    }
    const name = text(rec.upstream) || '?'
    const seen = upstreams.get(name)
    if (seen && typeof seen.seq === 'number' && typeof rec.seq === 'number' && seen.seq > rec.seq) {
      return // an older event replayed after a newer one
    }
    upstreams.set(name, rec)
    for (const entry of this.entries) {
      if (entry.kind === 'message' && text(entry.rec.message_id) === id) {
        fillDelivery(entry.tr.querySelector('.col-delivery'), id)
        entry.haystack = null
        if (this.selected === entry.key) showDeliveries(id)
      }
    }
  },

  pause () {
    this.paused = true
    const button = $('pause')
    button.textContent = 'Resume'
    button.dataset.paused = 'true'
    this.showPending()
  },

  resume () {
    this.paused = false
    const button = $('pause')
    button.textContent = 'Pause'
    button.dataset.paused = 'false'
    const held = this.pending
    this.pending = []
    this.pendingKeys.clear()
    this.letGo = 0
    for (const entry of held.slice(-MAX_ROWS)) this.incoming.push(entry)
    if (this.incoming.length > MAX_ROWS) this.incoming.splice(0, this.incoming.length - MAX_ROWS)
    this.flush()
    this.showPending()
  },

  showPending () {
    const note = $('pending')
    note.dataset.count = String(this.pending.length)
    if (!this.paused) {
      note.hidden = true
      note.textContent = ''
      return
    }
    const lost = this.letGo ? ` (the ${this.letGo} oldest let go)` : ''
    note.textContent = `Paused: ${this.pending.length} new message(s) held${lost}`
    note.hidden = false
  },

  clearAll () {
    closeDetail()
    for (const entry of this.entries) entry.tr.remove()
    this.entries = []
    this.byKey.clear()
    this.pending = []
    this.pendingKeys.clear()
    this.incoming = []
    this.letGo = 0
    this.counts = { message: 0, forwarded: 0, dropped: 0, invalid: 0, refused: 0 }
    $('empty').hidden = false
    this.showPending()
    this.showCounts()
  },

  setQuery (query) {
    this.query = query.trim().toLowerCase()
    for (const entry of this.entries) entry.tr.hidden = !this.matches(entry)
    this.showCounts()
  },

  matches (entry) {
    if (!this.query) return true
    if (entry.haystack === null || entry.haystack === undefined) entry.haystack = haystack(entry)
    return entry.haystack.includes(this.query)
  },

  showCounts () {
    const c = this.counts
    const parts = [`${c.message} message(s) since connecting`, `${c.forwarded} forwarded`,
      `${c.dropped} dropped`, `${c.invalid} invalid`]
    if (c.refused) parts.push(`${c.refused} request(s) refused`)
    if (this.query) {
      const shown = this.entries.filter((entry) => !entry.tr.hidden).length
      parts.push(`search: ${shown} of ${this.entries.length} loaded`)
    }
    $('counts').textContent = parts.join(' · ')
  },
}

function haystack (entry) {
  const rec = entry.rec
  const parts = [clockTime(rec.at), rec.type, rec.event, rec.user, rec.outcome, rec.rule,
    rec.reason, rec.message_id, rec.route, rec.write_key, rec.code, rec.message]
  for (const change of Array.isArray(rec.changes) ? rec.changes : []) {
    parts.push(change && change.rule)
  }
  if (entry.kind === 'message') {
    parts.push(JSON.stringify(rec.before ?? null), JSON.stringify(rec.after ?? null))
    const upstreams = live.deliveries.get(text(rec.message_id))
    if (upstreams) for (const [name, d] of upstreams) parts.push(name, d.outcome)
  }
  return parts.map(text).join('\n').toLowerCase()
}

function cell (name, value, extra = {}) {
  const shown = text(value)
  return el('td', { class: `col-${name}${shown ? '' : ' none'}`, title: shown || null, ...extra,
    text: shown || '—' })
}

function changedRules (rec) {
  return (Array.isArray(rec.changes) ? rec.changes : [])
    .filter((change) => change && !change.error && Array.isArray(change.paths) &&
      change.paths.length)
    .map((change) => text(change.rule))
}

function messageRow (rec) {
  const outcome = text(rec.outcome)
  const key = `m:${text(rec.seq)}:${text(rec.message_id)}`
  const tr = el('tr', {
    class: `row outcome-${outcome}`,
    'data-key': key,
    'data-kind': 'message',
    'data-seq': text(rec.seq),
    'data-message-id': text(rec.message_id),
    'data-outcome': outcome,
    'data-type': text(rec.type),
    'data-user': text(rec.user),
    tabindex: '0',
  })
  const ruleCell = el('td', { class: 'col-rule' })
  const changed = changedRules(rec)
  if (outcome === 'dropped') {
    ruleCell.dataset.rule = text(rec.rule)
    ruleCell.title = `dropped by ${text(rec.rule)}${rec.reason ? `: ${text(rec.reason)}` : ''}`
    ruleCell.append(el('span', { class: 'rule rule-drop', text: text(rec.rule) || '—' }))
  } else if (outcome === 'invalid') {
    ruleCell.title = `invalid: ${text(rec.reason)}`
    ruleCell.append(el('span', { class: 'rule rule-invalid', text: text(rec.reason) || 'invalid' }))
  } else if (changed.length) {
    ruleCell.dataset.changedBy = changed.join(' ')
    ruleCell.title = `changed by ${changed.join(', ')}`
    ruleCell.append(el('span', { class: 'rule rule-change', text: changed.join(', ') }))
  } else {
    ruleCell.classList.add('none')
    ruleCell.textContent = '—'
  }
  const delivery = el('td', { class: 'col-delivery' })
  fillDelivery(delivery, text(rec.message_id))
  tr.append(
    el('td', { class: 'col-time', title: text(rec.at), text: clockTime(rec.at) }),
    el('td', { class: 'col-type' }, el('span', { class: `type type-${TYPES.includes(rec.type)
      ? rec.type : 'other'}`, text: text(rec.type) || '?' })),
    cell('event', rec.event),
    cell('user', rec.user),
    el('td', { class: 'col-outcome' }, el('span', { class: `chip chip-${outcome}`,
      text: outcome })),
    ruleCell,
    delivery,
  )
  return tr
}

function refusedRow (rec) {
  const tr = el('tr', {
    class: 'row outcome-refused',
    'data-key': `r:${text(rec.seq)}:${text(rec.at)}`,
    'data-kind': 'refused',
    'data-seq': text(rec.seq),
    'data-outcome': 'refused',
    tabindex: '0',
  })
  tr.append(
    el('td', { class: 'col-time', title: text(rec.at), text: clockTime(rec.at) }),
    el('td', { class: 'col-type' }, el('span', { class: 'type type-other', text: 'request' })),
    el('td', { class: 'col-event', text: text(rec.route) }),
    el('td', { class: 'col-user none', text: text(rec.write_key) || '—' }),
    el('td', { class: 'col-outcome' }, el('span', { class: 'chip chip-refused',
      text: `refused ${text(rec.status)}` })),
    el('td', { class: 'col-rule' }, el('span', { class: 'rule rule-invalid',
      text: text(rec.code) })),
    el('td', { class: 'col-delivery none', text: '—' }),
  )
  return tr
}

const DELIVERY_MARK = { delivered: '✓', retrying: '↻', dead_letter: '✕', paused: '⏸' }

function fillDelivery (td, messageId) {
  clear(td)
  const upstreams = live.deliveries.get(messageId)
  if (!upstreams || !upstreams.size) {
    td.append(el('span', { class: 'muted', text: '—' }))
    return
  }
  for (const [name, d] of [...upstreams].sort(([a], [b]) => a.localeCompare(b))) {
    const outcome = text(d.outcome)
    td.append(el('span', {
      class: `chip chip-small delivery-${outcome}`,
      'data-upstream': name,
      'data-outcome': outcome,
      title: `${name}: ${outcome}${d.status ? ` (${d.status})` : ''}`,
      text: `${name} ${DELIVERY_MARK[outcome] || outcome}`,
    }))
  }
}

// ----------------------------------------------------------------------------------------------
// The detail pane

function openDetail (key) {
  const entry = live.byKey.get(key)
  if (!entry) return
  for (const row of document.querySelectorAll('#message-rows tr.selected')) {
    row.classList.remove('selected')
    row.removeAttribute('aria-selected')
  }
  entry.tr.classList.add('selected')
  entry.tr.setAttribute('aria-selected', 'true')
  live.selected = key
  const detail = $('detail')
  detail.dataset.key = key
  detail.dataset.kind = entry.kind
  if (entry.kind === 'message') fillMessageDetail(entry.rec)
  else fillRefusedDetail(entry.rec)
  detail.hidden = false
  detail.scrollTop = 0
  document.querySelector('.live').classList.add('has-detail')
}

function closeDetail () {
  live.selected = null
  $('detail').hidden = true
  document.querySelector('.live').classList.remove('has-detail')
  for (const row of document.querySelectorAll('#message-rows tr.selected')) {
    row.classList.remove('selected')
    row.removeAttribute('aria-selected')
  }
}

function meta (pairs) {
  const list = $('detail-meta')
  clear(list)
  for (const [name, value, id] of pairs) {
    if (value === null || value === undefined || value === '') continue
    list.append(el('dt', { text: name }), el('dd', { id, text: text(value) }))
  }
}

function fillMessageDetail (rec) {
  const detail = $('detail')
  detail.dataset.messageId = text(rec.message_id)
  detail.dataset.outcome = text(rec.outcome)
  $('detail-title').textContent = [rec.type, rec.event].filter(Boolean).map(text).join(' · ') ||
    'message'
  const sampled = typeof rec.sampled === 'number' && rec.sampled < 1
    ? `1 in ${Math.round(1 / rec.sampled)} shown (${percent(rec.sampled)})` : null
  meta([
    ['Received', fullTime(rec.at), 'detail-at'],
    ['User', rec.user, 'detail-user'],
    ['Route', rec.route, 'detail-route'],
    ['Write key', rec.write_key, 'detail-write-key'],
    ['Message id', rec.message_id, 'detail-message-id'],
    ['Sampling', sampled, 'detail-sampled'],
  ])

  const box = $('detail-outcome')
  clear(box)
  const outcome = text(rec.outcome)
  box.dataset.outcome = outcome
  if (outcome === 'dropped') {
    box.append(el('strong', { text: 'Dropped' }), ' by rule ',
      el('code', { id: 'detail-rule', class: 'rule rule-drop', text: text(rec.rule) || '?' }))
    if (rec.reason) {
      box.append(' — ', el('span', { id: 'detail-reason', text: text(rec.reason) }))
    }
    box.append(el('p', { class: 'muted', text: 'Nothing was stored: no upstream gets it.' }))
  } else if (outcome === 'invalid') {
    box.append(el('strong', { text: 'Refused as invalid' }), ' — ',
      el('span', { id: 'detail-reason', text: text(rec.reason) || 'no reason given' }))
    box.append(el('p', { class: 'muted', text: 'The vendor would drop it; it was not stored.' }))
  } else {
    const changed = changedRules(rec)
    box.append(el('strong', { text: 'Forwarded' }), changed.length
      ? ` — changed by ${changed.length} rule(s)` : ' — unchanged by the rules')
  }

  const marks = new Map() // path -> [rule ids]
  const list = $('detail-changes')
  clear(list)
  const changes = Array.isArray(rec.changes) ? rec.changes : []
  for (const change of changes) {
    if (!change || typeof change !== 'object') continue
    const rule = text(change.rule)
    const paths = Array.isArray(change.paths) ? change.paths.map(text) : []
    const item = el('li', { 'data-rule': rule }, el('code', { class: 'rule rule-change',
      text: rule }))
    if (change.error) {
      item.append(' failed: ', el('span', { class: 'error-text', text: text(change.error) }))
    }
    for (const path of paths) {
      if (!marks.has(path)) marks.set(path, [])
      marks.get(path).push(rule)
      const how = pathChange(rec.before, rec.after, path, outcome)
      item.append(' ', el('span', { class: `path path-${how}`, 'data-path': path,
        title: how, text: `${path} (${how})` }))
    }
    if (!paths.length && !change.error) item.append(el('span', { class: 'muted',
      text: ' (changed nothing)' }))
    list.append(item)
  }
  if (!list.childElementCount) {
    list.append(el('li', { class: 'muted', text: 'No rule changed it.' }))
  }

  showDeliveries(text(rec.message_id))
  renderJsonInto($('detail-before'), rec.before, marks, 'nothing received')
  renderJsonInto($('detail-after'), rec.after, marks,
    outcome === 'dropped' ? 'not stored: dropped' : outcome === 'invalid'
      ? 'not stored: invalid' : 'nothing stored')
}

function fillRefusedDetail (rec) {
  const detail = $('detail')
  detail.dataset.messageId = ''
  detail.dataset.outcome = 'refused'
  $('detail-title').textContent = `request refused (${text(rec.status)})`
  meta([
    ['Received', fullTime(rec.at), 'detail-at'],
    ['Route', rec.route, 'detail-route'],
    ['Write key', rec.write_key, 'detail-write-key'],
  ])
  const box = $('detail-outcome')
  clear(box)
  box.dataset.outcome = 'refused'
  box.append(el('strong', { text: `Refused ${text(rec.status)}` }), ' — ',
    el('code', { id: 'detail-rule', class: 'rule rule-invalid', text: text(rec.code) }), ' ',
    el('span', { id: 'detail-reason', text: text(rec.message) }))
  const list = $('detail-changes')
  clear(list)
  list.append(el('li', { class: 'muted', text: 'The whole request was refused: no message in it ' +
    'reached the rules.' }))
  showDeliveries('')
  renderJsonInto($('detail-before'), undefined, new Map(), 'not shown')
  renderJsonInto($('detail-after'), undefined, new Map(), 'nothing stored')
}

/** How the rules changed `path`: added, removed or changed (seen in before and after). */
function pathChange (before, after, path, outcome) {
  if (path === '.') return 'replaced'
  if (outcome !== 'forwarded' || after === null || after === undefined) return 'changed'
  const inBefore = has(before, path)
  const inAfter = has(after, path)
  if (inBefore && !inAfter) return 'removed'
  if (!inBefore && inAfter) return 'added'
  return 'changed'
}

function has (value, path) {
  let at = value
  for (const name of path.split('.')) {
    if (at === null || typeof at !== 'object' || Array.isArray(at) ||
        !Object.prototype.hasOwnProperty.call(at, name)) return false
    at = at[name]
  }
  return true
}

function showDeliveries (messageId) {
  const body = $('detail-deliveries')
  clear(body)
  const upstreams = messageId ? live.deliveries.get(messageId) : null
  const rows = upstreams ? [...upstreams].sort(([a], [b]) => a.localeCompare(b)) : []
  for (const [name, d] of rows) {
    const outcome = text(d.outcome)
    body.append(el('tr', { 'data-upstream': name, 'data-outcome': outcome },
      el('td', { text: name }),
      el('td', {}, el('span', { class: `chip chip-small delivery-${outcome}`,
        text: outcome.replace('_', ' ') })),
      el('td', { class: 'num', text: d.status === 0 ? 'no answer' : text(d.status) }),
      el('td', { title: text(d.at), text: clockTime(d.at) }),
      el('td', { class: 'muted', text: text(d.detail) })))
  }
  $('detail-no-delivery').hidden = rows.length > 0
}

// Pretty JSON as DOM nodes, each changed path's entry marked with the rules that changed it.

function renderJsonInto (pre, value, marks, missing) {
  clear(pre)
  pre.classList.toggle('json-replaced', marks.has('.'))
  if (value === null || value === undefined) {
    pre.classList.add('json-missing')
    pre.append(el('span', { class: 'muted', text: missing }))
    return
  }
  pre.classList.remove('json-missing')
  appendValue(pre, value, '', 0, marks)
}

const span = (cls, value) => el('span', { class: cls, text: value })
const indent = (depth) => '  '.repeat(depth)

function appendValue (parent, value, path, depth, marks) {
  if (value === null) return parent.append(span('j-null', 'null'))
  if (Array.isArray(value)) {
    if (!value.length) return parent.append(span('j-punct', '[]'))
    parent.append(span('j-punct', '['))
    value.forEach((item, i) => {
      parent.append(`\n${indent(depth + 1)}`)
      appendEntry(parent, null, item, path ? `${path}.${i}` : String(i), depth + 1, marks,
        i < value.length - 1)
    })
    return parent.append(`\n${indent(depth)}`, span('j-punct', ']'))
  }
  if (typeof value === 'object') {
    const keys = Object.keys(value)
    if (!keys.length) return parent.append(span('j-punct', '{}'))
    parent.append(span('j-punct', '{'))
    keys.forEach((key, i) => {
      parent.append(`\n${indent(depth + 1)}`)
      appendEntry(parent, key, value[key], path ? `${path}.${key}` : key, depth + 1, marks,
        i < keys.length - 1)
    })
    return parent.append(`\n${indent(depth)}`, span('j-punct', '}'))
  }
  if (typeof value === 'string') return parent.append(span('j-str', JSON.stringify(value)))
  if (typeof value === 'number') return parent.append(span('j-num', String(value)))
  if (typeof value === 'boolean') return parent.append(span('j-bool', String(value)))
  return parent.append(span('j-other', text(value)))
}

function appendEntry (parent, key, value, path, depth, marks, comma) {
  const rules = marks.get(path)
  const target = rules
    ? el('span', { class: 'changed', 'data-path': path, 'data-rule': rules.join(' '),
      title: `changed by ${rules.join(', ')}` })
    : parent
  if (key !== null) target.append(span('j-key', JSON.stringify(key)), span('j-punct', ': '))
  appendValue(target, value, path, depth, marks)
  if (rules) parent.append(target)
  if (comma) parent.append(span('j-punct', ','))
  if (rules) parent.append(el('span', { class: 'rule-tag', text: `← ${rules.join(', ')}` }))
}

// ----------------------------------------------------------------------------------------------
// Live view controls

$('message-rows').addEventListener('click', (event) => {
  const row = event.target.closest('tr[data-key]')
  if (row) openDetail(row.dataset.key)
})
$('message-rows').addEventListener('keydown', (event) => {
  if (event.key !== 'Enter' && event.key !== ' ') return
  const row = event.target.closest('tr[data-key]')
  if (!row) return
  event.preventDefault()
  openDetail(row.dataset.key)
})
$('detail-close').addEventListener('click', closeDetail)
document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && live.selected !== null && $('auth').hidden) closeDetail()
})

$('pause').addEventListener('click', () => (live.paused ? live.resume() : live.pause()))
$('clear-list').addEventListener('click', () => live.clearAll())
$('search').addEventListener('input', (event) => live.setQuery(event.target.value))

const FILTERS = ['user', 'type', 'event', 'outcome', 'upstream']

$('filters').addEventListener('submit', (event) => {
  event.preventDefault()
  applyFilters()
})
$('filters-clear').addEventListener('click', () => {
  for (const name of FILTERS) $(`filter-${name}`).value = ''
  applyFilters()
})

function applyFilters () {
  const params = new URLSearchParams()
  for (const name of FILTERS) {
    const value = $(`filter-${name}`).value.trim()
    if (value) params.set(name, value)
  }
  const form = $('filters')
  form.dataset.active = String([...params.keys()].length)
  tap.params = params
  live.clearAll() // the list shows what matches the filters: relay replays its recent matches
  if (token.get()) tap.start()
}

// ----------------------------------------------------------------------------------------------
// Users view (/admin/report)

async function loadReport () {
  const error = $('users-error')
  let report
  try {
    report = await getJson('/admin/report')
  } catch (err) {
    if (err instanceof Unauthorized) return
    error.textContent = `Cannot load the report: ${err.message}`
    error.hidden = false
    return
  }
  error.hidden = true
  const multi = Array.isArray(report.multi_group_users) ? report.multi_group_users : []
  const internal = Array.isArray(report.internal_users) ? report.internal_users : []
  const counters = report.counters && typeof report.counters === 'object' ? report.counters : {}

  const multiBody = $('multi-group-users').tBodies[0]
  clear(multiBody)
  for (const user of multi) {
    const groups = Array.isArray(user.groups) ? user.groups.map(text) : []
    const chips = el('td', { class: 'groups' })
    for (const group of groups) chips.append(el('span', { class: 'chip chip-group', text: group }))
    multiBody.append(el('tr', { 'data-user': text(user.user), 'data-groups': String(groups.length) },
      el('td', { class: 'mono', text: text(user.user) }), chips,
      el('td', { class: 'num', text: text(user.tracks_without_group) || '0' })))
  }
  $('multi-group-empty').hidden = multi.length > 0

  const internalBody = $('internal-users').tBodies[0]
  clear(internalBody)
  for (const user of internal) {
    internalBody.append(el('tr', { 'data-user': text(user.user) },
      el('td', { class: 'mono', text: text(user.user) }),
      el('td', { text: text(user.reason) }),
      el('td', { title: text(user.first_seen), text: fullTime(user.first_seen) })))
  }
  $('internal-empty').hidden = internal.length > 0

  const counterBody = $('rule-counters').tBodies[0]
  clear(counterBody)
  const names = Object.keys(counters).sort()
  for (const name of names) {
    const dot = name.indexOf('.')
    const kind = dot < 0 ? name : name.slice(0, dot)
    const rule = dot < 0 ? '' : name.slice(dot + 1)
    counterBody.append(el('tr', { 'data-counter': name },
      el('td', {}, el('span', { class: `chip chip-small counter-${kind}`, text: kind })),
      el('td', { class: 'mono', text: rule }),
      el('td', { class: 'num', text: text(counters[name]) })))
  }
  $('counters-empty').hidden = names.length > 0

  drawGroupsChart(multi)
  $('users-updated').textContent = `Updated ${clockTime(new Date().toISOString())}`
}

const SVG = 'http://www.w3.org/2000/svg'

function svg (tag, attrs = {}, content = null) {
  const node = document.createElementNS(SVG, tag)
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value))
  if (content !== null) node.textContent = content
  return node
}

/** Horizontal bars: how many users are in 2, 3, … groups (the report lists users in several). */
function drawGroupsChart (multi) {
  const box = $('groups-chart')
  clear(box)
  const CAP = 6
  const buckets = new Map()
  for (const user of multi) {
    const n = Array.isArray(user.groups) ? user.groups.length : 0
    if (n < 2) continue
    const bucket = Math.min(n, CAP)
    buckets.set(bucket, (buckets.get(bucket) || 0) + 1)
  }
  if (!buckets.size) {
    box.append(el('p', { class: 'muted', 'data-empty': 'true',
      text: 'No user is in more than one group.' }))
    return
  }
  const top = Math.max(...buckets.keys())
  const rows = []
  for (let n = 2; n <= top; n += 1) rows.push([n, buckets.get(n) || 0])
  const most = Math.max(...rows.map(([, count]) => count))
  const width = 420
  const labelWidth = 92
  const barArea = width - labelWidth - 44
  const rowHeight = 30
  const height = rows.length * rowHeight + 8
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, width, height, role: 'img',
    'aria-label': 'Users by number of groups', class: 'bars' })
  rows.forEach(([n, count], i) => {
    const y = 4 + i * rowHeight
    const label = n === CAP ? `${CAP}+ groups` : `${n} groups`
    const barWidth = count ? Math.max(2, Math.round(barArea * count / most)) : 0
    const group = svg('g', { 'data-groups': n, 'data-users': count })
    group.append(
      svg('text', { x: 0, y: y + 19, class: 'bar-label' }, label),
      svg('rect', { x: labelWidth, y: y + 4, width: barArea, height: 20, rx: 3,
        class: 'bar-track' }),
      svg('rect', { x: labelWidth, y: y + 4, width: barWidth, height: 20, rx: 3, class: 'bar' }),
      svg('text', { x: labelWidth + barWidth + 6, y: y + 19, class: 'bar-value' }, String(count)),
    )
    chart.append(group)
  })
  box.append(chart)
}

$('users-refresh').addEventListener('click', () => loadReport())

// ----------------------------------------------------------------------------------------------
// Queues view (/admin/queue), every 2 s while shown

const queues = {
  timer: null,
  running: false,

  start () {
    this.stop()
    this.running = true
    this.tick()
  },

  stop () {
    this.running = false
    clearTimeout(this.timer)
    this.timer = null
  },

  async tick () {
    if (!this.running) return
    await loadQueues()
    if (this.running) this.timer = setTimeout(() => this.tick(), QUEUE_EVERY_MS)
  },
}

async function loadQueues () {
  const error = $('queues-error')
  let body
  try {
    body = await getJson('/admin/queue')
  } catch (err) {
    if (err instanceof Unauthorized) return
    error.textContent = `Cannot load the queues: ${err.message}`
    error.hidden = false
    return
  }
  error.hidden = true
  const rows = $('queue-rows')
  clear(rows)
  for (const q of Array.isArray(body.upstreams) ? body.upstreams : []) {
    const name = text(q.upstream)
    const paused = q.paused === true
    const messages = typeof q.messages === 'number' ? q.messages : 0
    const dead = typeof q.dead_letters === 'number' ? q.dead_letters : 0
    const state = paused ? 'paused' : messages ? 'delivering' : 'up to date'
    const age = messages && typeof q.oldest_age_seconds === 'number'
      ? duration(q.oldest_age_seconds) : '—'
    rows.append(el('tr', { 'data-upstream': name, 'data-paused': String(paused),
      'data-messages': String(messages), 'data-dead-letters': String(dead) },
    el('td', { class: 'mono', text: name }),
    el('td', {}, el('span', { class: `chip chip-small queue-${state.replace(/ /g, '-')}`,
      text: state })),
    el('td', { class: 'num col-messages', text: String(messages) }),
    el('td', { class: 'num col-bytes', text: bytes(q.bytes) }),
    el('td', { class: 'num col-age', text: age }),
    el('td', { class: `num col-dead${dead ? ' has-dead' : ''}`, text: String(dead) })))
  }
  if (!rows.childElementCount) {
    rows.append(el('tr', {}, el('td', { colspan: '6', class: 'muted', text: 'No upstream.' })))
  }
  $('queues-updated').textContent = `Updated ${clockTime(new Date().toISOString())}`
}

// ----------------------------------------------------------------------------------------------
// Tabs

const VIEWS = ['live', 'users', 'queues']
let currentView = 'live'

function showView (name) {
  if (!VIEWS.includes(name)) name = 'live'
  currentView = name
  for (const view of VIEWS) {
    $(`view-${view}`).hidden = view !== name
    $(`tab-${view}`).setAttribute('aria-selected', String(view === name))
  }
  document.body.dataset.view = name
  if (history.replaceState) history.replaceState(null, '', `#${name}`)
  if (!token.get()) return
  if (name === 'users') loadReport()
  if (name === 'queues') queues.start()
  else queues.stop()
}

$('tabs').addEventListener('click', (event) => {
  const tab = event.target.closest('[data-tab]')
  if (tab) showView(tab.dataset.tab)
})

// ----------------------------------------------------------------------------------------------

const tap = new Tap()

function start () {
  tap.start()
  showView(currentView)
}

currentView = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : 'live'
live.showCounts()
if (token.get()) {
  $('forget-token').hidden = false
  start()
} else {
  showView(currentView)
  askToken('')
}
