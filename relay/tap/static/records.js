// What the tap's records say, read the same way by the list and the detail pane.

import { text } from './dom.js'

// A record's key in the list. The seq is in it because relay replays its recent records on
// every (re)connect, and the same record must not be listed twice.
export const messageKey = (rec) => `m:${text(rec.seq)}:${text(rec.message_id)}`
export const refusedKey = (rec) => `r:${text(rec.seq)}:${text(rec.at)}`

/** The ids of the rules that changed the message (a rule that failed, or changed no path, did
 * not). */
export function changedRules (rec) {
  return (Array.isArray(rec.changes) ? rec.changes : [])
    .filter((change) => change && !change.error && Array.isArray(change.paths) &&
      change.paths.length)
    .map((change) => text(change.rule))
}
