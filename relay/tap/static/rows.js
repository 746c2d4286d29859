// The live list's table rows: one per message (type, event, user, outcome, the rule that
// dropped or changed it, delivery per upstream) and one per request relay refused whole.
// The data-* attributes are what the tests and the stylesheet select on.

import { clear, el, text } from './dom.js'
import { byName, upstreamsOf } from './deliveries.js'
import { clockTime } from './format.js'
import { changedRules, messageKey, refusedKey } from './records.js'

const TYPES = ['track', 'identify', 'group', 'page', 'screen', 'alias']
const DELIVERY_MARK = { delivered: '✓', retrying: '↻', dead_letter: '✕', paused: '⏸' }

function cell (name, value, extra = {}) {
  const shown = text(value)
  return el('td', { class: `col-${name}${shown ? '' : ' none'}`, title: shown || null, ...extra,
    text: shown || '—' })
}

export function messageRow (rec) {
  const outcome = text(rec.outcome)
  const tr = el('tr', {
    class: `row outcome-${outcome}`,
    'data-key': messageKey(rec),
    'data-kind': 'message',
    'data-seq': text(rec.seq),
    'data-message-id': text(rec.message_id),
    'data-outcome': outcome,
    'data-type': text(rec.type),
    'data-user': text(rec.user),
    tabindex: '0',
  })
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
    ruleCell(rec, outcome),
    delivery,
  )
  return tr
}

/** The rule that dropped the message, why it is invalid, or the rules that changed it. */
function ruleCell (rec, outcome) {
  const td = el('td', { class: 'col-rule' })
  const changed = changedRules(rec)
  if (outcome === 'dropped') {
    td.dataset.rule = text(rec.rule)
    td.title = `dropped by ${text(rec.rule)}${rec.reason ? `: ${text(rec.reason)}` : ''}`
    td.append(el('span', { class: 'rule rule-drop', text: text(rec.rule) || '—' }))
  } else if (outcome === 'invalid') {
    td.title = `invalid: ${text(rec.reason)}`
    td.append(el('span', { class: 'rule rule-invalid', text: text(rec.reason) || 'invalid' }))
  } else if (changed.length) {
    td.dataset.changedBy = changed.join(' ')
    td.title = `changed by ${changed.join(', ')}`
    td.append(el('span', { class: 'rule rule-change', text: changed.join(', ') }))
  } else {
    td.classList.add('none')
    td.textContent = '—'
  }
  return td
}

export function refusedRow (rec) {
  const tr = el('tr', {
    class: 'row outcome-refused',
    'data-key': refusedKey(rec),
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

/** (Re)fills a row's delivery cell: a chip per upstream, marked with how delivery went. */
export function fillDelivery (td, messageId) {
  clear(td)
  const upstreams = upstreamsOf(messageId)
  if (!upstreams || !upstreams.size) {
    td.append(el('span', { class: 'muted', text: '—' }))
    return
  }
  for (const [name, d] of byName(upstreams)) {
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
