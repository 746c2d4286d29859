// Small DOM helpers for the debugger page.
//
// Payloads are hostile input: every value that comes from relay goes into the page as text
// (textContent, Text nodes, attribute values), never parsed as HTML. These helpers are the
// only way the other modules build elements, so they hold that line in one place.

export const $ = (id) => document.getElementById(id)

/** An element with `props` (class, text, dataset-like attributes) and children (nodes or text). */
export function el (tag, props = {}, ...children) {
  const node = document.createElement(tag)
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue
    if (name === 'class') node.className = value
    else if (name === 'text') node.textContent = String(value)
    else node.setAttribute(name, String(value))
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child) // strings become Text nodes
  }
  return node
}

export function clear (node) {
  while (node.firstChild) node.firstChild.remove()
}

/** A value from relay as a string: '' for null or undefined, whatever type it arrived as. */
export const text = (value) => (value === null || value === undefined ? '' : String(value))
