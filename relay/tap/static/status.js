// The connection status in the page's header. Both the token (refused, forgotten) and the
// stream (connecting, live, retrying) set it, so it lives apart from either.

import { $ } from './dom.js'

/** `state` is for the stylesheet (data-state) and the tests; `label` is what a person reads. */
export function setStatus (state, label) {
  const status = $('status')
  status.dataset.state = state
  status.textContent = label
}
