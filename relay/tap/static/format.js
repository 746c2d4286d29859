// How the debugger page writes times, sizes, durations and shares: short, local-time, and '—'
// for a value relay did not send as a number (a missing field is not zero).

import { text } from './dom.js'

const pad = (n, width = 2) => String(n).padStart(width, '0')

export function clockTime (iso) {
  const at = new Date(iso)
  if (Number.isNaN(at.getTime())) return text(iso)
  return `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}.` +
    pad(at.getMilliseconds(), 3)
}

export function fullTime (iso) {
  const at = new Date(iso)
  if (Number.isNaN(at.getTime())) return text(iso)
  return `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())} ${clockTime(iso)}`
}

export function bytes (n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '—'
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let value = n
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit += 1
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`
}

export function duration (seconds) {
  if (typeof seconds !== 'number' || !Number.isFinite(seconds)) return '—'
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`
  const minutes = Math.floor(seconds / 60)
  if (minutes < 60) return `${minutes} min ${Math.floor(seconds % 60)} s`
  const hours = Math.floor(minutes / 60)
  if (hours < 48) return `${hours} h ${minutes % 60} min`
  return `${Math.floor(hours / 24)} d ${hours % 24} h`
}

/** A share (0..1) as a percentage: one decimal below 10%, so a small sample does not read 0%. */
export function percent (share) {
  const value = share * 100
  return `${value >= 10 || value === 0 ? Math.round(value) : value.toFixed(1)}%`
}

/** "Updated hh:mm:ss.mmm", now: when a polled view last heard from relay. */
export const updatedNow = () => `Updated ${clockTime(new Date().toISOString())}`
