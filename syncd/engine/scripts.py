"""The Redis scripts of the publisher: a page's chunk (fence, change detection, events, dead
letters, the cursor), the index's precheck and migration, and the settle check of
`[redis] wait_replicas`. Text only; the publisher (`syncd.engine.publisher`) registers and
runs them. A reconciliation pass's own scripts are in `syncd.engine.pass_scripts`."""

# `#!lua` makes Redis (>= 7) refuse the whole script up front when over maxmemory, instead of
# failing between two writes: together with the fence this keeps a page all-or-nothing.
#
# The index layout (buckets, values, the hash) is described in `syncd.engine.index`, which
# does in Python what these functions do in Lua. Buckets are named from the index key
# (`<index>:<n>`): they are not passed as keys, but share the tenant's hash tag, so a cluster
# keeps them in the script's slot. A feed's index of the layout before buckets (`seen`, one
# hash: key -> fingerprint, sortable instant text, `|` and earlier fingerprints) is read as
# long as it holds keys, and each key moves to the buckets when a script writes it or
# MIGRATE_INDEX moves it.
INDEX_LIB = r"""
local FP, TS = 8, 8

-- The bucket hash: a decimal number below 10^15 without leading zeros is itself; any other
-- key a polynomial hash of its bytes modulo a prime below 2^32 (exact in Lua numbers).
local function hash(key)
  if #key <= 15 and string.find(key, '^[1-9][0-9]*$') then return tonumber(key) end
  local h = 0
  for i = 1, #key do h = (h * 257 + string.byte(key, i)) % 4294967291 end
  return h
end

local function bucket_of(h, level, split)
  local b = h % (2 ^ level)
  if b < split then b = h % (2 ^ (level + 1)) end
  return b
end

-- A bucket's key name, `<prefix><n>`, built once a script (one feed's index a script).
local bucket_names = {}
local function bucket_name(prefix, b)
  local name = bucket_names[b]
  if not name then
    name = prefix .. b
    bucket_names[b] = name
  end
  return name
end

-- The name of a key's bucket (bucket_of, with `low` = 2^level).
local function bucket_key(prefix, key, low, split)
  local h = hash(key)
  local b = h % low
  if b < split then b = h % (low + low) end
  return bucket_name(prefix, b)
end

-- level, split, count, mark of a feed's index (an index not written yet: 0, 0, 0, 1)
local function meta_of(meta)
  local m = redis.call('HMGET', meta, 'level', 'split', 'count', 'mark')
  return tonumber(m[1] or 0), tonumber(m[2] or 0), tonumber(m[3] or 0), tonumber(m[4] or 1)
end

-- A command on `key` with many arguments, a few thousand a call: Lua's unpack takes no more
-- (a bucket whose keys share their low bits holds as many keys as share them).
local function in_slices(command, key, args)
  for i = 1, #args, 4000 do
    redis.call(command, key, unpack(args, i, math.min(#args, i + 3999)))
  end
end

-- Linear hashing: split bucket `split` (its keys whose bucket one level up differs move to
-- bucket split + 2^level) while the index holds more than `load` keys a bucket.
local function grow(prefix, count, level, split, load)
  while count > load * (2 ^ level + split) do
    local high = 2 ^ level
    local src = bucket_name(prefix, split)
    local all = redis.call('HGETALL', src)
    local moved, gone = {}, {}
    for i = 1, #all, 2 do
      if hash(all[i]) % (high * 2) ~= split then
        moved[#moved + 1] = all[i]
        moved[#moved + 1] = all[i + 1]
        gone[#gone + 1] = all[i]
      end
    end
    if #gone > 0 then
      in_slices('HSET', bucket_name(prefix, split + high), moved)
      in_slices('HDEL', src, gone)
    end
    split = split + 1
    if split == high then level, split = level + 1, 0 end
  end
  return level, split
end

-- Packed instants: 100 ns ticks since 0001-01-01 UTC, unsigned big-endian 64 bits, read and
-- written as two 32-bit halves (a Lua number holds 53 bits exactly).
local function u32(s, i)
  local a, b, c, d = string.byte(s, i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function be32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                     math.floor(n / 256) % 256, n % 256)
end

local function before(a, b)
  local ah, bh = u32(a, 1), u32(b, 1)
  if ah ~= bh then return ah < bh end
  return u32(a, 5) < u32(b, 5)
end

-- Days from 0001-01-01 to a date, and back (proleptic Gregorian calendar).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 306
end

local function civil_from_days(z)
  z = z + 306
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- A packed instant as the event's `modified_at` text, `YYYY-MM-DDThh:mm:ss.fffffffZ`.
local function fixed_of(packed)
  local hi, lo = u32(packed, 1), u32(packed, 5)
  local r = hi * 4967296 + lo  -- 2^32 = 429 * 10^7 + 4967296
  local secs = hi * 429 + math.floor(r / 10000000)
  local frac = r % 10000000
  local days = math.floor(secs / 86400)
  local tod = secs - days * 86400
  local y, m, d = civil_from_days(days)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%07dZ', y, m, d,
                       math.floor(tod / 3600), math.floor(tod / 60) % 60, tod % 60, frac)
end

-- A sortable instant's text (`YYYY-MM-DDThh:mm:ss` and fraction digits) packed.
local function packed_of(text)
  local days = days_from_civil(tonumber(string.sub(text, 1, 4)), tonumber(string.sub(text, 6, 7)),
                               tonumber(string.sub(text, 9, 10)))
  local secs = days * 86400 + tonumber(string.sub(text, 12, 13)) * 3600
               + tonumber(string.sub(text, 15, 16)) * 60 + tonumber(string.sub(text, 18, 19))
  local frac = tonumber(string.sub(string.sub(text, 20) .. '0000000', 1, 7))
  -- secs * 10^7 + frac in two halves: secs = a * 2^20 + b
  local a = math.floor(secs / 1048576)
  local b = secs - a * 1048576
  local x = a * 10000000
  local xh = math.floor(x / 4096)
  local lo = (x - xh * 4096) * 1048576 + b * 10000000 + frac
  local carry = math.floor(lo / 4294967296)
  return be32(xh + carry) .. be32(lo - carry * 4294967296)
end

-- A value of the layout before buckets, as an index value marked `m`. One that is not such a
-- value (instant text that is not one, shorter than a fingerprint: a hand edit, say) reads as
-- a fingerprint without an instant, so the key's next version is published, never refused.
local function converted(v, m)
  local fp, rest = string.sub(v, 1, FP), string.sub(v, FP + 1)
  if #fp < FP then fp = fp .. string.rep('\0', FP - #fp) end
  local text, earlier = rest, ''
  local bar = string.find(rest, '|', 1, true)
  if bar then text, earlier = string.sub(rest, 1, bar - 1), string.sub(rest, bar + 1) end
  if not string.find(text, '^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%d*$') then return fp .. m end
  return fp .. m .. packed_of(text) .. earlier
end
"""

# A page's chunk: the fence, change detection against the index, events, dead letters, and
# (the page's last chunk) the cursor. Per record: key, what the index would keep (fingerprint,
# packed instant unless the record has none) followed by the event's `modified_at` when it
# is not the timestamp as sent, the timestamp as sent, data. A record whose data is empty
# (no record's is) is only marked: the precheck found it unchanged but for its mark.
#
# A reconciliation pass's page (ARGV[12] = '1') is fenced by the pass's own cursor (in the
# index's metadata) and only while the pass is fetching; it publishes what changed like any
# page (counted as drift) and marks every key it holds. Its last page starts the sweep. The
# records its precheck dropped as unchanged and marked were judged against the mark it looked
# up (ARGV[14]; '' when it looked nothing up): under another mark (a pass begun since) they
# would stay unmarked, so the page is refused like one the fence keeps out.
APPLY_PAGE = (
    r"""#!lua
local cursors, meta, old, stream, dead, state, dead_seen =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local feed, expected, new_cursor = ARGV[1], ARGV[2], ARGV[3]
-- '1': change detection; '2': the same, for a page whose keys are mostly new (a first sync):
-- each is first offered to its bucket as new, and only a key already there is compared.
local detect, fresh = ARGV[4] ~= '0', ARGV[4] == '2'
local n, ndead, now, more = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local stale = tonumber(ARGV[9])
local KEPT = tonumber(ARGV[10])
local LOAD = tonumber(ARGV[11])
local pass, page_records = ARGV[12] == '1', tonumber(ARGV[13])
local looked_up = ARGV[14]
"""
    + INDEX_LIB
    + r"""
local function holds(fps, fp)
  for i = 1, #fps, FP do
    if string.sub(fps, i, i + FP - 1) == fp then return true end
  end
  return false
end

local cursor_key, cursor_field = cursors, feed
if pass then
  if redis.call('HGET', meta, 'pass') ~= 'fetch' then return {2} end
  cursor_key, cursor_field = meta, 'pass_cursor'
end
local stored = redis.call('HGET', cursor_key, cursor_field)
if expected == '' then
  if stored then return {1, stored} end
elseif stored ~= string.sub(expected, 2) then
  if stored then return {1, stored} end
  return {1}
end
if pass and looked_up ~= '' and tonumber(looked_up) ~= select(4, meta_of(meta)) then
  if stored then return {1, stored} end
  return {1}
end

local base = 15
local W = 4
local published, unchanged = 0, 0
local has_old = false
if detect then
  local level, split, count, mark = meta_of(meta)
  local M = string.char(mark)
  local counted = count
  -- An event that fails (a command error: Redis keeps a script's earlier writes) ends the
  -- script with the index's count of keys still true for the keys written before it.
  local function failed(err)
    if count ~= counted then
      redis.call('HSET', meta, 'level', level, 'split', split, 'count', count, 'mark', mark)
    end
    return redis.error_reply(err)
  end
  has_old = redis.call('EXISTS', old) == 1
  local prefix = meta .. ':'
  local low = 2 ^ level
  for j = 0, n - 1 do
    local p = base + j * W
    local key, new = ARGV[p], ARGV[p + 1]
    local fp, ts = string.sub(new, 1, FP), string.sub(new, FP + 1, FP + TS)
    local at = string.sub(new, FP + TS + 1)
    if at == '' and ts ~= '' then at = ARGV[p + 2] end
    local bkey = bucket_key(prefix, key, low, split)
    local done = false
    if fresh and not has_old and ARGV[p + 3] ~= '' then
      if redis.call('HSETNX', bkey, key, fp .. M .. ts) == 1 then
        -- The index before the event here: an event that fails (Redis does not undo a
        -- script's earlier writes) takes its key out of the index again, or the page applied
        -- again would find the key unchanged and its event would be lost.
        local added = redis.pcall('XADD', stream, '*', 'op', 'created', 'key', key,
                                  'data', ARGV[p + 3], 'modified_on', ARGV[p + 2],
                                  'modified_at', at)
        if type(added) == 'table' and added.err then
          redis.call('HDEL', bkey, key)
          return failed(added.err)
        end
        published = published + 1
        count = count + 1
        done = true
      end
    end
    if not done then
      local cur = redis.call('HGET', bkey, key)
      local moving = false
      if not cur and has_old then
        local v1 = redis.call('HGET', old, key)
        if v1 then cur, moving = converted(v1, M), true end
      end
      local op = 'created'
      local value = fp .. M .. ts
      if ARGV[p + 3] == '' then  -- only to be marked: whatever the index holds now stays
        op, value = nil, nil
        if cur then
          unchanged = unchanged + 1
          if moving or string.sub(cur, FP + 1, FP + 1) ~= M then
            value = string.sub(cur, 1, FP) .. M .. string.sub(cur, FP + 2)
          end
        end
      elseif cur then
        op = 'updated'
        local old_fp = string.sub(cur, 1, FP)
        local old_ts = string.sub(cur, FP + 2, FP + 1 + TS)
        local earlier = string.sub(cur, FP + 2 + TS)
        if old_fp == fp
            or (ts ~= '' and old_ts ~= ''
                and (before(ts, old_ts) or (ts == old_ts and holds(earlier, fp)))) then
          if old_fp == fp then unchanged = unchanged + 1 else stale = stale + 1 end
          op = nil
          value = nil  -- the index keeps what it has, marked
          if moving or string.sub(cur, FP + 1, FP + 1) ~= M then
            value = old_fp .. M .. string.sub(cur, FP + 2)
          end
        elseif ts == '' and old_ts ~= '' then
          value = fp .. M .. old_ts  -- a record without a timestamp keeps its key's newest
          at = fixed_of(old_ts)
        elseif ts ~= '' and ts == old_ts then
          value = value .. string.sub(old_fp .. earlier, 1, FP * KEPT)
        end
      end
      if op then
        local added = redis.pcall('XADD', stream, '*', 'op', op, 'key', key, 'data', ARGV[p + 3],
                                  'modified_on', ARGV[p + 2], 'modified_at', at)
        if type(added) == 'table' and added.err then return failed(added.err) end
        published = published + 1
      end
      if not cur and value then count = count + 1 end
      if value then redis.call('HSET', bkey, key, value) end
      if moving then
        redis.call('HDEL', old, key)
        count = count + 1
      end
    end
  end
  if count ~= counted then
    level, split = grow(prefix, count, level, split, LOAD)
    redis.call('HSET', meta, 'level', level, 'split', split, 'count', count, 'mark', mark)
  end
else
  for j = 0, n - 1 do
    local p = base + j * W
    local new = ARGV[p + 1]
    local at = string.sub(new, FP + TS + 1)
    if at == '' and #new > FP then at = ARGV[p + 2] end
    redis.call('XADD', stream, '*', 'op', 'upsert', 'key', ARGV[p], 'data', ARGV[p + 3],
               'modified_on', ARGV[p + 2], 'modified_at', at)
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

local migrating = has_old and 1 or 0
if pass and published > 0 then redis.call('HINCRBY', meta, 'pass_drift', published) end
if new_cursor == '' then  -- a chunk before the page's last: the cursor stays where it is
  return {0, published, unchanged, stale, dead_new, migrating}
end
if pass then
  redis.call('HSET', meta, 'pass_cursor', new_cursor)
  redis.call('HINCRBY', meta, 'pass_fetched', page_records)
  if more == '0' then redis.call('HSET', meta, 'pass', 'sweep', 'sweep', 0) end
else
  redis.call('HSET', cursors, feed, new_cursor)
  redis.call('HSET', state, feed .. ':last_ok', now, feed .. ':more', more)
end
if stale > 0 then redis.call('HINCRBY', state, feed .. ':stale', stale) end
return {0, published, unchanged, stale, dead_new, migrating}
"""
)

# The precheck: the index values of some keys (nil for a key not in the index), after the
# index's mark. Reads only.
LOOKUP = (
    r"""#!lua flags=no-writes
local meta, old = KEYS[1], KEYS[2]
"""
    + INDEX_LIB
    + r"""
local level, split, count, mark = meta_of(meta)
local M = string.char(mark)
local has_old = redis.call('EXISTS', old) == 1
local prefix = meta .. ':'
local low = 2 ^ level
local out = {mark}
for i = 1, #ARGV do
  local key = ARGV[i]
  local v = redis.call('HGET', bucket_key(prefix, key, low, split), key)
  if not v and has_old then
    local v1 = redis.call('HGET', old, key)
    if v1 then v = converted(v1, M) end
  end
  out[i + 1] = v or false
end
return out
"""
)

# Moves up to about ARGV[1] keys of a feed's index of the layout before buckets into the
# buckets (a key already there stays as it is: it is newer). Returns the keys moved and those
# left; the scan's cursor is kept in the index's metadata, so a move resumes where it was.
MIGRATE_INDEX = (
    r"""#!lua
local meta, old = KEYS[1], KEYS[2]
local most, LOAD = tonumber(ARGV[1]), tonumber(ARGV[2])
"""
    + INDEX_LIB
    + r"""
local level, split, count, mark = meta_of(meta)
local M = string.char(mark)
local prefix = meta .. ':'
local low = 2 ^ level
local cursor = redis.call('HGET', meta, 'migrate') or '0'
local scanned = redis.call('HSCAN', old, cursor, 'COUNT', most)
local items = scanned[2]
local gone = {}
for i = 1, #items, 2 do
  local key = items[i]
  local bkey = bucket_key(prefix, key, low, split)
  if redis.call('HSETNX', bkey, key, converted(items[i + 1], M)) == 1 then count = count + 1 end
  gone[#gone + 1] = key
end
in_slices('HDEL', old, gone)
level, split = grow(prefix, count, level, split, LOAD)
local left = redis.call('HLEN', old)
redis.call('HSET', meta, 'level', level, 'split', split, 'count', count, 'mark', mark,
           'migrate', scanned[1])
if left == 0 then redis.call('HDEL', meta, 'migrate') end
return {#gone, left}
"""
)


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
