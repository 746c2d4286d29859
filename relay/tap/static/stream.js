// The live tap (/admin/tap): one fetch-based Server-Sent Events connection with the current
// filters, reconnected with backoff when it breaks, and after a countdown when relay says bye.
// What the events mean is not this module's business: it hands each one to a handler.

import { $, text } from './dom.js'
import { SseParser } from './sse.js'
import { setStatus } from './status.js'
import { askToken, token, tokenRefused } from './token.js'

const BYE_RECONNECT_S = 5
const MAX_RETRY_S = 15
// The events handed on; named, so an event called e.g. "constructor" reaches no handler.
const EVENTS = ['message', 'delivery', 'refused', 'sampling']

export class Tap {
  /** `handlers`: connected() once the stream is open, and one function per name in EVENTS,
   * given the event's parsed JSON object. */
  constructor (handlers) {
    this.handlers = handlers
    this.params = new URLSearchParams()
    this.controller = null
    // Bumped by every start and stop: a run that finds it changed has been replaced and stops.
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
    $('bye').hidden = true
    setStatus('connecting', 'Connecting…')
    const response = await this.open(current, controller.signal, generation)
    // stop() may have run while open() handed its answer back.
    if (!response || generation !== this.generation) return
    this.retryDelay = 1
    setStatus('live', 'Live')
    this.handlers.connected()
    await this.read(response.body, generation)
    if (generation !== this.generation) return
    if (this.byeReason !== null) return this.afterBye()
    this.retry('the stream ended')
  }

  /** The stream's response, or null when there is none to read (what happened is shown, and a
   * retry set where one can help). */
  async open (current, signal, generation) {
    const query = this.params.toString()
    let response
    try {
      response = await fetch(`/admin/tap${query ? `?${query}` : ''}`, {
        headers: { Authorization: `Bearer ${current}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal,
      })
    } catch {
      if (generation === this.generation) this.retry('relay does not answer')
      return null
    }
    if (generation !== this.generation) return null
    if (response.ok && response.body) return response
    if (response.status === 401) {
      tokenRefused()
    } else if (response.status === 404) {
      setStatus('off', 'Admin endpoints off (admin.token is empty)')
    } else {
      const why = await refusal(response)
      // Bad filters stay bad: retrying would only be refused again.
      if (response.status === 400) setStatus('closed', `Filters refused: ${why}`)
      else this.retry(why)
    }
    return null
  }

  /** Reads `body` to its end (or until stop() aborts it), dispatching each event. */
  async read (body, generation) {
    const reader = body.getReader()
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
      // aborted by stop(), or the connection broke: run() tells them apart by the generation
    }
  }

  dispatch (name, data) {
    let body
    try {
      body = JSON.parse(data)
    } catch {
      return // not ours to show; the next event is independent
    }
    if (body === null || typeof body !== 'object') return
    if (EVENTS.includes(name)) this.handlers[name](body)
    else if (name === 'bye') this.byeReason = text(body.reason) || 'no reason given'
  }

  retry (why) {
    const seconds = this.retryDelay
    this.retryDelay = Math.min(this.retryDelay * 2, MAX_RETRY_S)
    setStatus('reconnecting', `Disconnected (${why}); retrying in ${seconds} s`)
    clearTimeout(this.retryTimer)
    this.retryTimer = setTimeout(() => this.start(), seconds * 1000)
  }

  /** relay ended the stream on purpose (e.g. shutting down): say why, count down, reconnect. */
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
