// The admin token: asked once, kept in this tab's sessionStorage (gone when the tab closes,
// never in a URL or a cookie), sent only as an Authorization header. Also the authorised JSON
// fetch the report and queue views use, which asks for the token again when relay refuses it.

import { $ } from './dom.js'
import { setStatus } from './status.js'

const TOKEN_KEY = 'relay.admin.token'

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
}

export class Unauthorized extends Error {}

// Set by wireToken: this module cannot import what reads with the token (the stream, the
// queue poller) without those importing it back.
let readers = { start () {}, stop () {} }

export function askToken (why) {
  const error = $('auth-error')
  error.textContent = why || ''
  error.hidden = !why
  $('auth').hidden = false
  $('forget-token').hidden = true
  const input = $('auth-token')
  input.value = ''
  input.focus()
}

/** relay answered 401: the kept token is wrong (or changed in relay's config), so drop it. */
export function tokenRefused () {
  token.clear()
  readers.stop()
  setStatus('unauthorized', 'Token refused')
  askToken('relay refused this token (401). Enter the admin token again.')
}

/** The token form and the "Forget token" button; `start` opens what reads with a new token,
 * `stop` closes it when the token is refused or forgotten. */
export function wireToken ({ start, stop }) {
  readers = { start, stop }
  $('auth-form').addEventListener('submit', (event) => {
    event.preventDefault()
    const value = $('auth-token').value.trim()
    if (!value) return
    token.set(value)
    $('auth-token').value = ''
    $('auth-error').hidden = true
    $('auth').hidden = true
    $('forget-token').hidden = false
    readers.start()
  })
  $('forget-token').addEventListener('click', () => {
    token.clear()
    readers.stop()
    setStatus('idle', 'Not connected')
    askToken('')
  })
}

/** GET `path` with the token; the parsed JSON. Throws Unauthorized on a 401 (after asking for
 * the token again), an Error with relay's message otherwise. */
export async function getJson (path) {
  const current = token.get()
  if (!current) throw new Unauthorized('no token')
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${current}`, Accept: 'application/json' },
    cache: 'no-store',
  })
  if (response.status === 401) {
    tokenRefused()
    throw new Unauthorized('token refused')
  }
  if (response.status === 404) {
    throw new Error('the admin endpoints are off (admin.token is empty in relay\'s config)')
  }
  let body = null
  try {
    body = await response.json()
  } catch {
    body = null
  }
  if (!response.ok) {
    const why = body && typeof body.message === 'string' ? body.message : response.statusText
    throw new Error(`relay answered ${response.status}: ${why}`)
  }
  return body
}

// The JSON at `path` for a view, or null once the view's error line (`errorId`) says why it
// could not be had (or the token form is up again, which says it all).
export async function loadJson (path, errorId, what) {
  const error = $(errorId)
  try {
    const body = await getJson(path)
    error.hidden = true
    return body
  } catch (err) {
    if (!(err instanceof Unauthorized)) {
      error.textContent = `Cannot load ${what}: ${err.message}`
      error.hidden = false
    }
    return null
  }
}
