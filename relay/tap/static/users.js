// The Users view (/admin/report): users seen in several companies, internal users dropped by
// drop_internal_users, and each rule's counters. Loaded when the view is shown or refreshed.

import { $, clear, el, text } from './dom.js'
import { fullTime, updatedNow } from './format.js'
import { drawGroupsChart } from './groups-chart.js'
import { loadJson } from './token.js'

export async function loadReport () {
  const report = await loadJson('/admin/report', 'users-error', 'the report')
  if (report === null) return
  const multi = Array.isArray(report.multi_group_users) ? report.multi_group_users : []
  const internal = Array.isArray(report.internal_users) ? report.internal_users : []
  const counters = report.counters && typeof report.counters === 'object' ? report.counters : {}
  showMultiGroup(multi)
  showInternal(internal)
  showCounters(counters)
  drawGroupsChart(multi)
  $('users-updated').textContent = updatedNow()
}

export function wireUsers () {
  $('users-refresh').addEventListener('click', () => loadReport())
}

function showMultiGroup (multi) {
  const body = $('multi-group-users').tBodies[0]
  clear(body)
  for (const user of multi) {
    const groups = Array.isArray(user.groups) ? user.groups.map(text) : []
    const chips = el('td', { class: 'groups' })
    for (const group of groups) chips.append(el('span', { class: 'chip chip-group', text: group }))
    body.append(el('tr', { 'data-user': text(user.user), 'data-groups': String(groups.length) },
      el('td', { class: 'mono', text: text(user.user) }), chips,
      el('td', { class: 'num', text: text(user.tracks_without_group) || '0' })))
  }
  $('multi-group-empty').hidden = multi.length > 0
}

function showInternal (internal) {
  const body = $('internal-users').tBodies[0]
  clear(body)
  for (const user of internal) {
    body.append(el('tr', { 'data-user': text(user.user) },
      el('td', { class: 'mono', text: text(user.user) }),
      el('td', { text: text(user.reason) }),
      el('td', { title: text(user.first_seen), text: fullTime(user.first_seen) })))
  }
  $('internal-empty').hidden = internal.length > 0
}

/** Counters are named "<what>.<rule id>" (e.g. dropped.drop_internal_users#1). */
function showCounters (counters) {
  const body = $('rule-counters').tBodies[0]
  clear(body)
  const names = Object.keys(counters).sort()
  for (const name of names) {
    const dot = name.indexOf('.')
    const kind = dot < 0 ? name : name.slice(0, dot)
    const rule = dot < 0 ? '' : name.slice(dot + 1)
    body.append(el('tr', { 'data-counter': name },
      el('td', {}, el('span', { class: `chip chip-small counter-${kind}`, text: kind })),
      el('td', { class: 'mono', text: rule }),
      el('td', { class: 'num', text: text(counters[name]) })))
  }
  $('counters-empty').hidden = names.length > 0
}
