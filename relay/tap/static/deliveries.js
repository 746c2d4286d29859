// What relay last said about delivering each message to each upstream. Delivery events arrive
// after their message (sometimes long after, on retries) and are kept apart from the list so a
// message that is not listed yet, or filtered out of view, still shows them when it is.

import { text } from './dom.js'

const MAX_DELIVERY_IDS = 5000 // message ids whose delivery state is remembered

const byMessage = new Map() // message_id -> Map(upstream -> delivery), oldest message first

/** The Map(upstream -> delivery record) for `messageId`, or undefined if none arrived. */
export const upstreamsOf = (messageId) => byMessage.get(messageId)

/** Keeps `rec` as its upstream's latest word on its message; that message's id, or '' when
 * `rec` has none or is older than what is kept. */
export function recordDelivery (rec) {
  const id = text(rec.message_id)
  if (!id) return ''
  let upstreams = byMessage.get(id)
  if (!upstreams) {
    upstreams = new Map()
    byMessage.set(id, upstreams)
    if (byMessage.size > MAX_DELIVERY_IDS) byMessage.delete(byMessage.keys().next().value)
  }
  const name = text(rec.upstream) || '?'
  const seen = upstreams.get(name)
  if (seen && typeof seen.seq === 'number' && typeof rec.seq === 'number' && seen.seq > rec.seq) {
    return '' // an older event replayed after a newer one
  }
  upstreams.set(name, rec)
  return id
}

/** `upstreams` as [name, delivery] pairs, by upstream name. */
export const byName = (upstreams) => [...upstreams].sort(([a], [b]) => a.localeCompare(b))
