// A message as pretty-printed JSON built from DOM nodes (so a payload stays text), each entry
// at a changed path wrapped and tagged with the rules that changed it.

import { clear, el, text } from './dom.js'

/** Fills `pre` with `value`; `marks` maps a dotted path to the rule ids that changed it ('.' is
 * the whole message); `missing` is what to say when there is no value. */
export function renderJsonInto (pre, value, marks, missing) {
  clear(pre)
  pre.classList.toggle('json-replaced', marks.has('.'))
  if (value === null || value === undefined) {
    pre.classList.add('json-missing')
    pre.append(el('span', { class: 'muted', text: missing }))
    return
  }
  pre.classList.remove('json-missing')
  appendValue(pre, value, '', 0, marks)
}

const span = (cls, value) => el('span', { class: cls, text: value })
const indent = (depth) => '  '.repeat(depth)

function appendValue (parent, value, path, depth, marks) {
  if (value === null) return parent.append(span('j-null', 'null'))
  if (Array.isArray(value)) {
    if (!value.length) return parent.append(span('j-punct', '[]'))
    parent.append(span('j-punct', '['))
    value.forEach((item, i) => {
      parent.append(`\n${indent(depth + 1)}`)
      appendEntry(parent, null, item, path ? `${path}.${i}` : String(i), depth + 1, marks,
        i < value.length - 1)
    })
    return parent.append(`\n${indent(depth)}`, span('j-punct', ']'))
  }
  if (typeof value === 'object') {
    const keys = Object.keys(value)
    if (!keys.length) return parent.append(span('j-punct', '{}'))
    parent.append(span('j-punct', '{'))
    keys.forEach((key, i) => {
      parent.append(`\n${indent(depth + 1)}`)
      appendEntry(parent, key, value[key], path ? `${path}.${key}` : key, depth + 1, marks,
        i < keys.length - 1)
    })
    return parent.append(`\n${indent(depth)}`, span('j-punct', '}'))
  }
  if (typeof value === 'string') return parent.append(span('j-str', JSON.stringify(value)))
  if (typeof value === 'number') return parent.append(span('j-num', String(value)))
  if (typeof value === 'boolean') return parent.append(span('j-bool', String(value)))
  return parent.append(span('j-other', text(value)))
}

/** One array item or object member; `key` is null for an array item. */
function appendEntry (parent, key, value, path, depth, marks, comma) {
  const rules = marks.get(path)
  // The wrapper holds key and value only: the comma and the rule tag stay outside the mark.
  const target = rules
    ? el('span', { class: 'changed', 'data-path': path, 'data-rule': rules.join(' '),
      title: `changed by ${rules.join(', ')}` })
    : parent
  if (key !== null) target.append(span('j-key', JSON.stringify(key)), span('j-punct', ': '))
  appendValue(target, value, path, depth, marks)
  if (rules) parent.append(target)
  if (comma) parent.append(span('j-punct', ','))
  if (rules) parent.append(el('span', { class: 'rule-tag', text: `← ${rules.join(', ')}` }))
}
