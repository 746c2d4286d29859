// The detail pane for the selected row: the message before and after the rules with each
// changed path marked, which rules changed it, why it was dropped or refused, and how its
// delivery went at each upstream.

import { $, clear, el, text } from './dom.js'
import { byName, upstreamsOf } from './deliveries.js'
import { clockTime, fullTime, percent } from './format.js'
import { renderJsonInto } from './json-view.js'
import { changedRules } from './records.js'

let selected = null // the shown entry's key

/** The key of the entry the pane shows, or null when it is closed. */
export const selectedKey = () => selected

/** Shows `entry` ({key, kind, rec, tr}, as the live list keeps it) and marks its row. */
export function openDetail (entry) {
  unselectRows()
  entry.tr.classList.add('selected')
  entry.tr.setAttribute('aria-selected', 'true')
  selected = entry.key
  const detail = $('detail')
  detail.dataset.key = entry.key
  detail.dataset.kind = entry.kind
  if (entry.kind === 'message') fillMessageDetail(entry.rec)
  else fillRefusedDetail(entry.rec)
  detail.hidden = false
  detail.scrollTop = 0
  document.querySelector('.live').classList.add('has-detail')
}

export function closeDetail () {
  selected = null
  $('detail').hidden = true
  document.querySelector('.live').classList.remove('has-detail')
  unselectRows()
}

function unselectRows () {
  for (const row of document.querySelectorAll('#message-rows tr.selected')) {
    row.classList.remove('selected')
    row.removeAttribute('aria-selected')
  }
}

/** The close button, and Escape (unless the token form is up: Escape there is the form's). */
export function wireDetail () {
  $('detail-close').addEventListener('click', closeDetail)
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && selected !== null && $('auth').hidden) closeDetail()
  })
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
  const outcome = text(rec.outcome)
  showOutcome(rec, outcome)
  const marks = showChanges(rec, outcome)
  showDeliveries(text(rec.message_id))
  renderJsonInto($('detail-before'), rec.before, marks, 'nothing received')
  renderJsonInto($('detail-after'), rec.after, marks,
    outcome === 'dropped' ? 'not stored: dropped' : outcome === 'invalid'
      ? 'not stored: invalid' : 'nothing stored')
}

/** What became of the message: dropped by which rule, invalid why, or forwarded. */
function showOutcome (rec, outcome) {
  const box = $('detail-outcome')
  clear(box)
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
}

/** Lists each rule's changes (or failure); the marks for the JSON: path -> [rule ids]. */
function showChanges (rec, outcome) {
  const marks = new Map()
  const list = $('detail-changes')
  clear(list)
  for (const change of Array.isArray(rec.changes) ? rec.changes : []) {
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
  return marks
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

/** How the rules changed `path`: added, removed or changed (seen in before and after). Only a
 * forwarded message has an "after" to compare with. */
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

/** The delivery table for `messageId` ('' for none): one row per upstream. */
export function showDeliveries (messageId) {
  const body = $('detail-deliveries')
  clear(body)
  const upstreams = messageId ? upstreamsOf(messageId) : null
  const rows = upstreams ? byName(upstreams) : []
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
