// The three views (Live, Users, Queues) as tabs. The shown view is kept in the URL's fragment,
// so a reload opens the same one; the Users and Queues views load only while shown.

import { $ } from './dom.js'
import { queues } from './queues.js'
import { token } from './token.js'
import { loadReport } from './users.js'

const VIEWS = ['live', 'users', 'queues']
let currentView = 'live'

function showView (name) {
  if (!VIEWS.includes(name)) name = 'live'
  currentView = name
  for (const view of VIEWS) {
    $(`view-${view}`).hidden = view !== name
    $(`tab-${view}`).setAttribute('aria-selected', String(view === name))
  }
  document.body.dataset.view = name
  if (history.replaceState) history.replaceState(null, '', `#${name}`)
  if (!token.get()) return
  if (name === 'users') loadReport()
  if (name === 'queues') queues.start()
  else queues.stop()
}

/** Shows the view last chosen (or named in the URL); loads it when a token is kept. */
export const showCurrentView = () => showView(currentView)

/** The tab buttons, and the view the URL names. */
export function wireTabs () {
  const named = location.hash.slice(1)
  currentView = VIEWS.includes(named) ? named : 'live'
  $('tabs').addEventListener('click', (event) => {
    const tab = event.target.closest('[data-tab]')
    if (tab) showView(tab.dataset.tab)
  })
}
