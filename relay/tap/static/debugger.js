// relay's debugger page, the entry module: wires the live tap (/admin/tap), the report
// (/admin/report) and the queues (/admin/queue) together and starts reading once there is an
// admin token. Each part is its own module; this one only connects them, so they need not
// import each other in circles.
//
// Payloads are hostile input: every value that comes from relay is put in the page as text
// (textContent, Text nodes, attribute values), never parsed as HTML (see dom.js).

import { wireDetail } from './detail.js'
import { $ } from './dom.js'
import { wireFilters } from './filters.js'
import { live, showSampling, wireLive } from './live.js'
import { queues } from './queues.js'
import { Tap } from './stream.js'
import { showCurrentView, wireTabs } from './tabs.js'
import { askToken, token, wireToken } from './token.js'
import { wireUsers } from './users.js'

const tap = new Tap({
  connected: () => live.connected(),
  message: (rec) => live.addMessage(rec),
  delivery: (rec) => live.addDelivery(rec),
  refused: (rec) => live.addRefused(rec),
  sampling: showSampling,
})

function start () {
  tap.start()
  showCurrentView()
}

function stop () {
  tap.stop()
  queues.stop()
}

wireToken({ start, stop })
wireLive()
wireDetail()
wireFilters(tap)
wireUsers()
wireTabs()
$('reconnect').addEventListener('click', () => tap.start())

live.showCounts()
if (token.get()) {
  $('forget-token').hidden = false
  start()
} else {
  showCurrentView()
  askToken('')
}
