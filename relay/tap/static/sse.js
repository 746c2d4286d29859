// The Server-Sent Events wire format, parsed from text chunks as fetch delivers them. The page
// reads the stream with fetch because EventSource cannot send the Authorization header.

export class SseParser {
  /** `onEvent(name, data, lastId)` is called once per complete event that carried data. */
  constructor (onEvent) {
    this.onEvent = onEvent
    this.buffer = ''
    this.event = ''
    this.data = []
    this.lastId = ''
  }

  push (chunk) {
    this.buffer += chunk
    // A chunk ending in \r may be the first half of \r\n: keep it for the next one.
    const held = this.buffer.endsWith('\r') ? 1 : 0
    const usable = this.buffer.slice(0, this.buffer.length - held)
    const lines = usable.split(/\r\n|\r|\n/)
    this.buffer = lines.pop() + (held ? '\r' : '')
    for (const line of lines) this.line(line)
  }

  line (line) {
    if (line === '') {
      if (this.data.length) this.onEvent(this.event || 'message', this.data.join('\n'), this.lastId)
      this.event = ''
      this.data = []
      return
    }
    if (line.startsWith(':')) return // a comment: relay's keepalive
    const colon = line.indexOf(':')
    const field = colon < 0 ? line : line.slice(0, colon)
    let value = colon < 0 ? '' : line.slice(colon + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    if (field === 'event') this.event = value
    else if (field === 'data') this.data.push(value)
    else if (field === 'id' && !value.includes('\0')) this.lastId = value
  }
}
