"""What ``RedisSharedLayer`` stores in Redis: key layout, value format, Lua scripts.

Keys (``{ws}`` is the workspace id in literal braces: a Redis Cluster hash tag, so a
workspace's keys share one slot and every script touches a single slot)::

    pm:v1:{ws}:u:<identity digest>   hash    field "<context digest>:<experience key>" ->
                                             JSON {"t": fetched_at, "x": wire shape | null};
                                             expires after the store's retention;
                                             field "g": the identity's generation
                                             (``INVALIDATE_SCRIPT`` starts a new one,
                                             ``SET_SCRIPT`` writes only under it)
    pm:v1:{ws}:l:<identity>:<context>:<keys digest>
                                     string  the fetch lease: the holder's token (PX, renewed
                                             while it fetches), then "done:ok"/"done:err"
                                             for a moment so latecomers read the outcome
    pm:v1:{ws}:rl                    zset    the rate limiter's grants (``_limiter.py``)
    pm:v1:{ws}:rl:procs              zset    processes that asked the limiter lately
    pm:v1:{ws}:pause                 string  a 429's Retry-After, as a PX expiry
    pm:v1:{ws}:events                channel invalidations and refreshes (``_broadcast.py``)
    pm:v1:{ws}:version               string  bumped with every refresh broadcast

The format version is part of every key: a new format gets new keys rather than misreading
old values. No raw identity is ever in a key (digests only). Values are JSON (never pickle:
whatever is in Redis is only data), bounded in size and validated when read back, so a
foreign or corrupt value is a miss, never an error.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..._models import CachedExperience, Experience

__all__ = [
    "CLAIM_SCRIPT",
    "DONE",
    "FAILED",
    "FORMAT_VERSION",
    "INVALIDATE_SCRIPT",
    "RELEASE",
    "RELEASE_SCRIPT",
    "RENEW_SCRIPT",
    "SET_SCRIPT",
    "decode_entry",
    "encode_entry",
]

FORMAT_VERSION = "v1"
#: Lease outcomes: the fetch succeeded (results are in the data hash), it failed (others
#: should not all retry it at once), or no call was made (delete: someone else may try).
DONE, FAILED, RELEASE = "done:ok", "done:err", ""
#: A value "fetched" further in the future than this is foreign (clocks differ a little).
MAX_CLOCK_SKEW = 60.0

# KEYS: lease, pause, data. ARGV: token, lease ms, fields... One round trip tells a caller
# whether fetching is paused, hands it the lease, or tells it what the holder achieved
# (with the holder's results when it succeeded).
CLAIM_SCRIPT = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {'paused', paused} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'acquired', 0} end
local state = redis.call('GET', KEYS[1])
if state == ARGV[1] then return {'acquired', 0} end  -- ours: a retry after a lost reply
if state == 'done:ok' then
  return {'done:ok', 0, redis.call('HMGET', KEYS[3], unpack(ARGV, 3))}
end
if state == 'done:err' then return {'done:err', 0} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then  -- not ours (no expiry): take it over rather than wait forever
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'acquired', 0}
end
return {'held', ttl}
"""

# KEYS: lease. ARGV: token, outcome ('' deletes), outcome ms. Only the holder may release.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: data hash. ARGV: retention ms, max fields, generation ('*': any; '': none yet;
# else the generation the fetch began under), then (field, fetched_at, value)...
# Writes nothing (returns -1) when the identity's generation changed since the fetch
# began: it was invalidated meanwhile, and a late answer must not undo that. Never
# replaces a newer entry with an older one; keeps the newest max-fields fields; a foreign
# key of another type is replaced.
SET_SCRIPT = """
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
local foreign = kind ~= 'hash' and kind ~= 'none'  -- never invalidated by us: no generation
if foreign then redis.call('DEL', key) end
if ARGV[3] ~= '*' and not foreign and (redis.call('HGET', key, 'g') or '') ~= ARGV[3] then
  return -1
end
local function stamp(v)
  if not v then return nil end
  return tonumber(string.match(v, '^{"t":(-?[%d%.eE+-]+)'))
end
local written = 0
for i = 4, #ARGV, 3 do
  local old = stamp(redis.call('HGET', key, ARGV[i]))
  if not (old and old > tonumber(ARGV[i + 1])) then
    redis.call('HSET', key, ARGV[i], ARGV[i + 2])
    written = written + 1
  end
end
local n = redis.call('HLEN', key)
local max_fields = tonumber(ARGV[2])
if n > max_fields then
  local all = redis.call('HGETALL', key)
  local items = {}
  for j = 1, #all, 2 do
    if all[j] ~= 'g' then table.insert(items, {all[j], stamp(all[j + 1]) or 0}) end
  end
  table.sort(items, function(a, b) return a[2] < b[2] end)
  for j = 1, #items - max_fields do redis.call('HDEL', key, items[j][1]) end
end
if n > 0 then redis.call('PEXPIRE', key, ARGV[1]) end
return written
"""

# KEYS: data hash. ARGV: retention ms, channel, message. Forgets every entry of the
# identity and starts a new generation: the Redis clock in microseconds (above the last
# one), so a value never comes back, even after the hash expired; then tells the other
# processes (their L1 copies go too).
INVALIDATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local old = 0
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  old = tonumber(redis.call('HGET', KEYS[1], 'g') or '0') or 0
end
local g = string.format('%.0f', math.max(now, old + 1))
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'g', g)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return g
"""


def encode_entry(entry: CachedExperience, max_bytes: int) -> bytes | None:
    """The JSON stored for one entry (``"t"`` first: the set script reads it), or
    ``None`` when it is over ``max_bytes`` or not serialisable."""
    wire = entry.experience.to_api() if entry.experience is not None else None
    try:
        text = json.dumps(
            {"t": float(entry.fetched_at), "x": wire},
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError):
        return None
    data = text.encode("utf-8")
    return data if len(data) <= max_bytes else None


def decode_entry(key: str, raw: Any, now: float, max_bytes: int) -> CachedExperience | None:
    """The entry in ``raw``, or ``None`` for anything that is not a value we wrote."""
    if not isinstance(raw, bytes | str) or len(raw) > max_bytes:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or "x" not in data:
        return None
    stamp, wire = data.get("t"), data["x"]
    if isinstance(stamp, bool) or not isinstance(stamp, int | float):
        return None
    if not math.isfinite(stamp) or stamp > now + MAX_CLOCK_SKEW:
        return None
    fetched_at = min(float(stamp), now)
    if wire is None:
        return CachedExperience(None, fetched_at)
    if not isinstance(wire, dict):
        return None
    try:
        return CachedExperience(Experience.from_api(key, wire), fetched_at)
    except (ValueError, TypeError):
        return None
