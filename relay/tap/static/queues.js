// The Queues view (/admin/queue): each upstream's waiting messages, bytes, oldest age and dead
// letters, polled every QUEUE_EVERY_MS while the view is shown.

import { $, clear, el, text } from './dom.js'
import { bytes, duration, updatedNow } from './format.js'
import { loadJson } from './token.js'

const QUEUE_EVERY_MS = 2000

export const queues = {
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

  // The next poll is set once this one is answered, so a slow relay is never asked twice at once.
  async tick () {
    if (!this.running) return
    await loadQueues()
    if (this.running) this.timer = setTimeout(() => this.tick(), QUEUE_EVERY_MS)
  },
}

async function loadQueues () {
  const body = await loadJson('/admin/queue', 'queues-error', 'the queues')
  if (body === null) return
  const rows = $('queue-rows')
  clear(rows)
  for (const q of Array.isArray(body.upstreams) ? body.upstreams : []) rows.append(queueRow(q))
  if (!rows.childElementCount) {
    rows.append(el('tr', {}, el('td', { colspan: '6', class: 'muted', text: 'No upstream.' })))
  }
  $('queues-updated').textContent = updatedNow()
}

function queueRow (q) {
  const name = text(q.upstream)
  const paused = q.paused === true
  const messages = typeof q.messages === 'number' ? q.messages : 0
  const dead = typeof q.dead_letters === 'number' ? q.dead_letters : 0
  const state = paused ? 'paused' : messages ? 'delivering' : 'up to date'
  const age = messages && typeof q.oldest_age_seconds === 'number'
    ? duration(q.oldest_age_seconds) : '—'
  return el('tr', { 'data-upstream': name, 'data-paused': String(paused),
    'data-messages': String(messages), 'data-dead-letters': String(dead) },
  el('td', { class: 'mono', text: name }),
  el('td', {}, el('span', { class: `chip chip-small queue-${state.replace(/ /g, '-')}`,
    text: state })),
  el('td', { class: 'num col-messages', text: String(messages) }),
  el('td', { class: 'num col-bytes', text: bytes(q.bytes) }),
  el('td', { class: 'num col-age', text: age }),
  el('td', { class: `num col-dead${dead ? ' has-dead' : ''}`, text: String(dead) }))
}
