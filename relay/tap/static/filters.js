// The filter form above the live list. relay filters the tap itself (and replays its recent
// matches), so applying filters reconnects the stream rather than hiding rows; the search box
// is what narrows what is already loaded.

import { $ } from './dom.js'
import { live } from './live.js'
import { token } from './token.js'

const FILTERS = ['user', 'type', 'event', 'outcome', 'upstream']

/** Apply and Clear; `tap` is the stream (stream.js) the filters are sent with. */
export function wireFilters (tap) {
  $('filters').addEventListener('submit', (event) => {
    event.preventDefault()
    applyFilters(tap)
  })
  $('filters-clear').addEventListener('click', () => {
    for (const name of FILTERS) $(`filter-${name}`).value = ''
    applyFilters(tap)
  })
}

function applyFilters (tap) {
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
