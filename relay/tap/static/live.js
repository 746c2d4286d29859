// The live list: messages and refused requests as the tap sends them, newest on top, at most
// MAX_ROWS kept; pause (new ones held, not drawn), the search over what is loaded, the counts,
// and the sampling banner.

import { $, text } from './dom.js'
import { recordDelivery, upstreamsOf } from './deliveries.js'
import { closeDetail, openDetail, selectedKey, showDeliveries } from './detail.js'
import { clockTime, percent } from './format.js'
import { messageKey, refusedKey } from './records.js'
import { fillDelivery, messageRow, refusedRow } from './rows.js'

const MAX_ROWS = 500 // messages kept in the list (and in the DOM)
const MAX_PENDING = 5000 // messages held while paused; beyond, the oldest held are let go
const FLUSH_MS = 30 // a burst of arrivals is drawn in one go, not one row at a time

const noCounts = () => ({ message: 0, forwarded: 0, dropped: 0, invalid: 0, refused: 0 })

export const live = {
  entries: [], // shown, oldest first: {key, kind, rec, tr, haystack}
  byKey: new Map(),
  pending: [], // arrived while paused
  pendingKeys: new Set(),
  letGo: 0, // held while paused but let go (over MAX_PENDING)
  incoming: [], // arrived, not yet drawn
  flushTimer: null,
  paused: false,
  query: '',
  counts: noCounts(),

  connected () {
    $('empty').textContent = 'Connected. Waiting for messages… Send an event to relay and it ' +
      'shows up here.'
  },

  addMessage (rec) {
    this.counts.message += 1
    if (['forwarded', 'dropped', 'invalid'].includes(rec.outcome)) this.counts[rec.outcome] += 1
    this.arrive({ key: messageKey(rec), kind: 'message', rec })
  },

  addRefused (rec) {
    this.counts.refused += 1
    this.arrive({ key: refusedKey(rec), kind: 'refused', rec })
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
      if (this.flushTimer === null) this.flushTimer = setTimeout(() => this.flush(), FLUSH_MS)
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
      if (selectedKey() === old.key) closeDetail()
    }
    $('empty').hidden = this.entries.length > 0
    this.showCounts()
  },

  addDelivery (rec) {
    const id = recordDelivery(rec)
    if (!id) return
    for (const entry of this.entries) {
      if (entry.kind === 'message' && text(entry.rec.message_id) === id) {
        fillDelivery(entry.tr.querySelector('.col-delivery'), id)
        entry.haystack = null // the search covers delivery outcomes
        if (selectedKey() === entry.key) showDeliveries(id)
      }
    }
  },

  open (key) {
    const entry = this.byKey.get(key)
    if (entry) openDetail(entry)
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
    this.counts = noCounts()
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

/** All the text the search looks in, lower-cased; kept on the entry until a delivery changes
 * it. */
function haystack (entry) {
  const rec = entry.rec
  const parts = [clockTime(rec.at), rec.type, rec.event, rec.user, rec.outcome, rec.rule,
    rec.reason, rec.message_id, rec.route, rec.write_key, rec.code, rec.message]
  for (const change of Array.isArray(rec.changes) ? rec.changes : []) {
    parts.push(change && change.rule)
  }
  if (entry.kind === 'message') {
    parts.push(JSON.stringify(rec.before ?? null), JSON.stringify(rec.after ?? null))
    const upstreams = upstreamsOf(text(rec.message_id))
    if (upstreams) for (const [name, d] of upstreams) parts.push(name, d.outcome)
  }
  return parts.map(text).join('\n').toLowerCase()
}

/** The tap's "sampling" event: relay shows this viewer only a share of the messages. */
export function showSampling (body) {
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

/** Opening a row (click, Enter or Space), pause, clear and search. */
export function wireLive () {
  const rows = $('message-rows')
  rows.addEventListener('click', (event) => {
    const row = event.target.closest('tr[data-key]')
    if (row) live.open(row.dataset.key)
  })
  rows.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter' && event.key !== ' ') return
    const row = event.target.closest('tr[data-key]')
    if (!row) return
    event.preventDefault()
    live.open(row.dataset.key)
  })
  $('pause').addEventListener('click', () => (live.paused ? live.resume() : live.pause()))
  $('clear-list').addEventListener('click', () => live.clearAll())
  $('search').addEventListener('input', (event) => live.setQuery(event.target.value))
}
