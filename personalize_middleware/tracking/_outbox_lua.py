"""The Lua scripts of the Redis event outbox (``_outbox_redis``): each runs atomically in
Redis, so the bounds and the stream cannot disagree."""

from __future__ import annotations

__all__ = ["ACK_SCRIPT", "PUT_SCRIPT", "READ_SCRIPT"]

# KEYS: stream, counts. ARGV: max_len, max_per_visitor, counts ttl (ms), then pairs of
# (visitor digest, entry). Returns {XLEN, "<one digit per entry: 0 stored, 1 full, 2 flood>"}
# (one string, not an array: the client reads it in one go).
PUT_SCRIPT = """
local len = redis.call('XLEN', KEYS[1])
local cap, share = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 4, #ARGV, 2 do
  if len >= cap then
    out[#out + 1] = 1
  elseif tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0') >= share then
    out[#out + 1] = 2
  else
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i + 1])
    redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
    len = len + 1
    out[#out + 1] = 0
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {len, table.concat(out)}
"""

# KEYS: stream, counts. ARGV: group, then pairs of (entry id, visitor digest). An entry
# deleted twice (two processes delivered it) is counted down once. Returns XLEN.
ACK_SCRIPT = """
for i = 2, #ARGV, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    if redis.call('HINCRBY', KEYS[2], ARGV[i + 1], -1) <= 0 then
      redis.call('HDEL', KEYS[2], ARGV[i + 1])
    end
  end
end
return redis.call('XLEN', KEYS[1])
"""


# KEYS: stream. ARGV: group, consumer, count. XREADGROUP of new entries, answered as one
# string of "<id> <entry>" lines (entries are JSON: no raw newline), then XLEN: one bulk
# string to read instead of five lines an entry.
READ_SCRIPT = """
local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                       'STREAMS', KEYS[1], '>')
local out = {}
if res then
  for _, message in ipairs(res[1][2]) do
    local fields, entry = message[2], ''
    for i = 1, #fields, 2 do
      if fields[i] == 'e' then entry = fields[i + 1] end
    end
    out[#out + 1] = message[1] .. ' ' .. entry
  end
end
return {redis.call('XLEN', KEYS[1]), table.concat(out, string.char(10))}
"""
