"""The Redis scripts of the publisher: a page's chunk (fence, change detection, events, dead
letters, the cursor) and the settle check of `[redis] wait_replicas`. Text only; the
publisher (`syncd.engine.publisher`) registers and runs them."""

# `#!lua` makes Redis (>= 7) refuse the whole script up front when over maxmemory, instead of
# failing between two writes: together with the fence this keeps a page all-or-nothing.
#
# A `seen` value is the record's fingerprint (FINGERPRINT_BYTES) followed by the sortable
# instant of the newest timestamp published for the key ("" when none; values written before
# timestamps were stored are the bare fingerprint, which reads the same way). Instants are
# `YYYY-MM-DDThh:mm:ss` (UTC) and fractional digits: a fixed-width prefix, so `<` orders them.
# When versions published in a row share that timestamp, `|` and the fingerprints of the
# earlier ones (newest first, at most SAME_INSTANT_KEPT) follow: a repeated tail serving one of
# them again is an older version, not a change (else two versions would take turns forever).
APPLY_PAGE = r"""#!lua
local cursors, seen, stream, dead, state, dead_seen =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local feed, expected, new_cursor = ARGV[1], ARGV[2], ARGV[3]
local detect = ARGV[4] == '1'
local n, ndead, now, more = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local stale = tonumber(ARGV[9])
local FP = tonumber(ARGV[10])
local KEPT = tonumber(ARGV[11])

local function parts(v)  -- fingerprint, instant, earlier fingerprints at that instant
  local rest = string.sub(v, FP + 1)
  local bar = string.find(rest, '|', 1, true)
  local fp = string.sub(v, 1, FP)
  if bar then return fp, string.sub(rest, 1, bar - 1), string.sub(rest, bar + 1) end
  return fp, rest, ''
end

-- The event's `modified_at`: the instant at a fixed width, `...Thh:mm:ss.fffffffZ`
-- (syncd.instants.fixed_width, FRACTION_DIGITS = 7). A record without a timestamp gets the
-- newest instant published for its key, so that a key's events never go back in
-- (modified_at, entry id) order; "" when the key has none (and without change detection).
local function fixed(ts)
  if ts == '' then return '' end
  return string.sub(ts, 1, 19) .. '.' .. string.sub(string.sub(ts, 20) .. '0000000', 1, 7) .. 'Z'
end

local function holds(fps, fp)
  for i = 1, #fps, FP do
    if string.sub(fps, i, i + FP - 1) == fp then return true end
  end
  return false
end

local stored = redis.call('HGET', cursors, feed)
if expected == '' then
  if stored then return {1, stored} end
elseif stored ~= string.sub(expected, 2) then
  if stored then return {1, stored} end
  return {1}
end

local base = 12
local W = 4
local published, unchanged = 0, 0
local CHUNK = 1000
if detect then
  local olds = {}
  local i = 0
  while i < n do
    local last = math.min(n, i + CHUNK)
    local args = {}
    for j = i, last - 1 do args[#args + 1] = ARGV[base + j * W] end
    local got = redis.call('HMGET', seen, unpack(args))
    for j = 1, #got do olds[i + j] = got[j] end
    i = last
  end
  local pending = {}
  for j = 0, n - 1 do
    local p = base + j * W
    local key, new = ARGV[p], ARGV[p + 1]
    local fp, ts = string.sub(new, 1, FP), string.sub(new, FP + 1)
    local old = olds[j + 1]
    local op = 'created'
    local at = ts  -- the event's instant: a record without one keeps its key's newest
    if old then
      op = 'updated'
      local old_fp, old_ts, earlier = parts(old)
      if old_fp == fp then
        op = nil
        unchanged = unchanged + 1
      elseif ts ~= '' and old_ts ~= ''
          and (ts < old_ts or (ts == old_ts and holds(earlier, fp))) then
        op = nil
        stale = stale + 1
      elseif ts == '' and old_ts ~= '' then
        new = fp .. old_ts
        at = old_ts
      elseif ts ~= '' and ts == old_ts then
        new = new .. '|' .. string.sub(old_fp .. earlier, 1, FP * KEPT)
      end
    end
    if op then
      redis.call('XADD', stream, '*', 'op', op, 'key', key, 'data', ARGV[p + 3],
                 'modified_on', ARGV[p + 2], 'modified_at', fixed(at))
      pending[#pending + 1] = key
      pending[#pending + 1] = new
      published = published + 1
      if #pending >= 2 * CHUNK then
        redis.call('HSET', seen, unpack(pending))
        pending = {}
      end
    end
  end
  if #pending > 0 then redis.call('HSET', seen, unpack(pending)) end
else
  for j = 0, n - 1 do
    local p = base + j * W
    redis.call('XADD', stream, '*', 'op', 'upsert', 'key', ARGV[p], 'data', ARGV[p + 3],
               'modified_on', ARGV[p + 2], 'modified_at', fixed(string.sub(ARGV[p + 1], FP + 1)))
  end
  published = n
end

local d = base + n * W
local dead_new = 0
for j = 0, ndead - 1 do
  local q = d + j * 3
  if redis.call('SADD', dead_seen, ARGV[q]) == 1 then
    redis.call('XADD', dead, '*', 'feed', feed, 'reason', ARGV[q + 1], 'data', ARGV[q + 2])
    dead_new = dead_new + 1
  end
end

if new_cursor == '' then  -- a chunk before the page's last: the cursor stays where it is
  return {0, published, unchanged, stale, dead_new}
end
redis.call('HSET', cursors, feed, new_cursor)
redis.call('HSET', state, feed .. ':last_ok', now, feed .. ':more', more)
if stale > 0 then redis.call('HINCRBY', state, feed .. ':stale', stale) end
return {0, published, unchanged, stale, dead_new}
"""


# With `[redis] wait_replicas`: a feed's stored cursor, read together with a write (when its
# replicas were last asked about it), so that a WAIT after it on the same connection covers
# every write the primary made before, the cursor's included. WAIT counts the writes of its own
# connection (newer servers only those that reached the replication stream): a read alone
# would prove nothing. Only the state hash is touched; the page script stays the one place
# where a feed's cursor, stream and index change.
SETTLE = r"""#!lua
local stored = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1] .. ':settle', ARGV[2])
return stored
"""
