"""The Lua that runs inside Redis: every decision that must come out the same whatever order the
relays' writes arrive in is made there, atomically, never read by a relay and then written.

Keys, under the configured prefix P:
  P u:<userId> / P a:<anonymousId>  a hash per user ref: g, gt (the current group and the event
                                    time that made it current), i, it (internal: the reason and
                                    when first seen), t (track calls without a group), and on an
                                    anonymous ref l (the userId it is linked to)
  P l:<userId>                      a set: the anonymousIds linked to that userId
  P m:<ref>                         a hash: the groups a ref was seen in -> when last seen
  P internal, P multi               sorted sets of refs (internal; in more than one group),
                                    scored by when last written, for `relay report`
  P epoch                           set once by the first relay to find Redis empty; a relay that
                                    finds it gone or changed knows Redis lost its data and sends
                                    its own state again
Every key but the epoch expires ttl seconds after it was last written; the sorted sets are
pruned of refs not written for as long.
"""

from __future__ import annotations

# ARGV: the prefix, the refs (a JSON list: one argument costs the client one encoding, where a
# key each cost relay's main thread ~1.7 µs a ref). Gives the epoch (false when there is none),
# then g, gt, i for each ref (false where unset).
FETCH = """
local p = ARGV[1]
local out = {redis.call('GET', p .. 'epoch') or false}
for _, ref in ipairs(cjson.decode(ARGV[2])) do
  local v = redis.call('HMGET', p .. ref, 'g', 'gt', 'i')
  out[#out + 1] = v[1] or false
  out[#out + 1] = v[2] or false
  out[#out + 1] = v[3] or false
end
return out
"""

# ARGV: prefix, ttl (seconds), now (seconds since the epoch), a new epoch (set when there is
# none), the ops (a JSON list). Applies them in order; gives the epoch as it now is.
APPLY = """
local p, ttl, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function touch(key) redis.call('EXPIRE', key, ttl) end
local function mark(ref, reason, at)
  local key = p .. ref
  if redis.call('HSETNX', key, 'i', reason) == 1 then
    redis.call('HSET', key, 'it', at)
    redis.call('ZADD', p .. 'internal', now, ref)
  end
  touch(key)
  if string.sub(ref, 1, 2) == 'a:' then
    -- one verdict for all of a user's ids: an anonymousId marks the userId it is linked to
    local user = redis.call('HGET', key, 'l')
    if not user then return end
    ref = 'u:' .. user
    if redis.call('HSETNX', p .. ref, 'i', 'linked') == 1 then
      redis.call('HSET', p .. ref, 'it', at)
      redis.call('ZADD', p .. 'internal', now, ref)
    end
    touch(p .. ref)
  end
  if string.sub(ref, 1, 2) == 'u:' then
    for _, anon in ipairs(redis.call('SMEMBERS', p .. 'l:' .. string.sub(ref, 3))) do
      local akey = p .. 'a:' .. anon
      if redis.call('HSETNX', akey, 'i', 'linked') == 1 then
        redis.call('HSET', akey, 'it', at)
        redis.call('ZADD', p .. 'internal', now, 'a:' .. anon)
        touch(akey)
      end
    end
  end
end
local function group(ref, id, at)
  local key = p .. ref
  local cur = redis.call('HMGET', key, 'g', 'gt')
  if not cur[2] or at > cur[2] or (at == cur[2] and id > cur[1]) then
    redis.call('HSET', key, 'g', id, 'gt', at)
  end
  touch(key)
end
local function link(anon, user)
  local akey, ukey = p .. 'a:' .. anon, p .. 'u:' .. user
  local before = redis.call('HGET', akey, 'l')
  if before ~= user then
    if before then redis.call('SREM', p .. 'l:' .. before, anon) end
    redis.call('HSET', akey, 'l', user)
  end
  redis.call('SADD', p .. 'l:' .. user, anon)
  touch(akey)
  touch(p .. 'l:' .. user)
  local ui, ai = redis.call('HEXISTS', ukey, 'i'), redis.call('HEXISTS', akey, 'i')
  if ui == 1 and ai == 0 then mark('a:' .. anon, 'linked', now) end
  if ai == 1 and ui == 0 then mark('u:' .. user, 'linked', now) end
end
local function member(ref, id, at)
  local key = p .. 'm:' .. ref
  redis.call('HSET', key, id, at)
  touch(key)
  if redis.call('HLEN', key) > 1 then redis.call('ZADD', p .. 'multi', now, ref) end
end
for _, op in ipairs(cjson.decode(ARGV[5])) do
  local kind = op[1]
  if kind == 'g' then group(op[2], op[3], op[4])
  elseif kind == 'i' then mark(op[2], op[3], op[4])
  elseif kind == 'l' then link(op[2], op[3])
  elseif kind == 'm' then member(op[2], op[3], op[4])
  elseif kind == 't' then
    redis.call('HINCRBY', p .. op[2], 't', op[3])
    touch(p .. op[2])
  end
end
for _, index in ipairs({'internal', 'multi'}) do
  redis.call('ZREMRANGEBYSCORE', p .. index, '-inf', now - ttl)
end
redis.call('SET', p .. 'epoch', ARGV[4], 'NX')
return redis.call('GET', p .. 'epoch')
"""

# ARGV: prefix, now, ttl. Gives what `relay report` lists: for every ref in more than one group,
# the ref, its track calls without a group and its groups; then a false; then for every
# internal ref, the ref, the reason and when first seen.
REPORT = """
local p, since = ARGV[1], tonumber(ARGV[2]) - tonumber(ARGV[3])
local out = {}
for _, ref in ipairs(redis.call('ZRANGEBYSCORE', p .. 'multi', since, '+inf')) do
  local groups = redis.call('HKEYS', p .. 'm:' .. ref)
  if #groups > 1 and redis.call('HEXISTS', p .. ref, 'i') == 0 then
    out[#out + 1] = ref
    out[#out + 1] = redis.call('HGET', p .. ref, 't') or '0'
    table.sort(groups)
    out[#out + 1] = table.concat(groups, '\\n')
  end
end
out[#out + 1] = false
for _, ref in ipairs(redis.call('ZRANGEBYSCORE', p .. 'internal', since, '+inf')) do
  local v = redis.call('HMGET', p .. ref, 'i', 'it')
  if v[1] then
    out[#out + 1] = ref
    out[#out + 1] = v[1]
    out[#out + 1] = v[2] or '0'
  end
end
return out
"""
