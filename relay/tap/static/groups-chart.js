// The Users view's bar chart: how many users are in 2, 3, … groups (6 and more in one bar), as
// an inline SVG built node by node (so no markup is parsed and the CSP needs no exception).

import { $, clear, el } from './dom.js'

const SVG = 'http://www.w3.org/2000/svg'
const CAP = 6 // the last bar counts users in this many groups or more
const WIDTH = 420
const LABEL_WIDTH = 92
const BAR_AREA = WIDTH - LABEL_WIDTH - 44 // room left for the count after the longest bar
const ROW_HEIGHT = 30

function svg (tag, attrs = {}, content = null) {
  const node = document.createElementNS(SVG, tag)
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value))
  if (content !== null) node.textContent = content
  return node
}

/** Draws the chart for the report's multi-group users (each with its `groups`). */
export function drawGroupsChart (multi) {
  const box = $('groups-chart')
  clear(box)
  const rows = countByGroups(multi)
  if (!rows.length) {
    box.append(el('p', { class: 'muted', 'data-empty': 'true',
      text: 'No user is in more than one group.' }))
    return
  }
  const most = Math.max(...rows.map(([, count]) => count))
  const height = rows.length * ROW_HEIGHT + 8
  const chart = svg('svg', { viewBox: `0 0 ${WIDTH} ${height}`, width: WIDTH, height,
    role: 'img', 'aria-label': 'Users by number of groups', class: 'bars' })
  rows.forEach(([n, count], i) => chart.append(bar(n, count, most, 4 + i * ROW_HEIGHT)))
  box.append(chart)
}

/** [groups, users] for 2 up to the most groups seen (capped), empty bars included so the axis
 * has no gaps; [] when no user is in two groups or more. */
function countByGroups (multi) {
  const buckets = new Map()
  for (const user of multi) {
    const n = Array.isArray(user.groups) ? user.groups.length : 0
    if (n < 2) continue
    const bucket = Math.min(n, CAP)
    buckets.set(bucket, (buckets.get(bucket) || 0) + 1)
  }
  if (!buckets.size) return []
  const top = Math.max(...buckets.keys())
  const rows = []
  for (let n = 2; n <= top; n += 1) rows.push([n, buckets.get(n) || 0])
  return rows
}

function bar (n, count, most, y) {
  const label = n === CAP ? `${CAP}+ groups` : `${n} groups`
  const barWidth = count ? Math.max(2, Math.round(BAR_AREA * count / most)) : 0
  const group = svg('g', { 'data-groups': n, 'data-users': count })
  group.append(
    svg('text', { x: 0, y: y + 19, class: 'bar-label' }, label),
    svg('rect', { x: LABEL_WIDTH, y: y + 4, width: BAR_AREA, height: 20, rx: 3,
      class: 'bar-track' }),
    svg('rect', { x: LABEL_WIDTH, y: y + 4, width: barWidth, height: 20, rx: 3, class: 'bar' }),
    svg('text', { x: LABEL_WIDTH + barWidth + 6, y: y + 19, class: 'bar-value' },
      String(count)),
  )
  return group
}
