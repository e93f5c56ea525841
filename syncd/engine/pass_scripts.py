"""The Redis scripts of a reconciliation pass (`syncd.engine.reconcile`): its start (a new mark)
and its sweep (a `deleted` event per key the pass did not mark). Text only, on the index layout
of `syncd.engine.scripts` (its INDEX_LIB)."""

from syncd.engine.scripts import INDEX_LIB

__all__ = ["PASS_START", "SWEEP"]

# A reconciliation pass of a feed begins (or, when one is under way, goes on): a new mark
# (1 to 255, never the last one), its counts at zero, its cursor at the feed's beginning.
# Returns whether it began, and the pass's phase; `migrating` (nothing begun) while keys are
# left in the layout before buckets, which the sweep would not see.
PASS_START = r"""#!lua
local meta, old = KEYS[1], KEYS[2]
local phase = redis.call('HGET', meta, 'pass')
if phase then return {0, phase} end
if redis.call('EXISTS', old) == 1 then return {0, 'migrating'} end
local mark = tonumber(redis.call('HGET', meta, 'mark') or '1') % 255 + 1
redis.call('HDEL', meta, 'pass_cursor', 'sweep')
redis.call('HSET', meta, 'mark', mark, 'pass', 'fetch', 'pass_started', ARGV[1],
           'pass_fetched', 0, 'pass_drift', 0, 'pass_deleted', 0)
return {1, 'fetch'}
"""

# The sweep at the end of a pass: from bucket ARGV[1] (which must be where the sweep is: the
# fence), the buckets in order until about ARGV[2] keys were looked at; every key not marked
# by the pass is gone upstream: one `deleted` event each (its `modified_at` the sweep's instant
# ARGV[4], or the key's newest when that is later; empty, like every version of its key, for a
# key that never had one), and its index entry goes. Keys only
# move to higher buckets when the index grows, so none is missed; those met twice are marked.
# At the last bucket the pass ends and its figures go to the feed's state.
SWEEP = (
    r"""#!lua
local meta, stream, state = KEYS[1], KEYS[2], KEYS[3]
local from, budget, on, at, feed, now = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4],
  ARGV[5], ARGV[6]
"""
    + INDEX_LIB
    + r"""
if redis.call('HGET', meta, 'pass') ~= 'sweep' then return {2} end
local pos = tonumber(redis.call('HGET', meta, 'sweep'))
if pos ~= from then return {1, pos} end
local level, split, count, mark = meta_of(meta)
local M = string.char(mark)
local buckets = 2 ^ level + split
local prefix = meta .. ':'
local looked, deleted = 0, 0
while pos < buckets and looked < budget do
  local name = bucket_name(prefix, pos)
  local all = redis.call('HGETALL', name)
  local gone = {}
  for i = 1, #all, 2 do
    local v = all[i + 1]
    if string.sub(v, FP + 1, FP + 1) ~= M then
      -- Never older than the key's newest instant (one dated ahead of this clock): a delete
      -- outranks every version before it, the entry id deciding between equal instants. A
      -- key that never had one is ordered by entry ids alone, its delete too: dated, the
      -- delete would outrank every version published after it (a key that comes back).
      local key_at = ''
      if #v >= FP + 1 + TS then
        key_at = fixed_of(string.sub(v, FP + 2, FP + 1 + TS))
        if at > key_at then key_at = at end
      end
      redis.call('XADD', stream, '*', 'op', 'deleted', 'key', all[i], 'data', '',
                 'modified_on', on, 'modified_at', key_at)
      gone[#gone + 1] = all[i]
    end
  end
  in_slices('HDEL', name, gone)
  deleted = deleted + #gone
  looked = looked + #all / 2
  pos = pos + 1
end
count = count - deleted
redis.call('HSET', meta, 'count', count, 'sweep', pos)
local total = redis.call('HINCRBY', meta, 'pass_deleted', deleted)
if pos < buckets then return {0, 0, deleted, pos} end
-- The pass's figures: the keys it left in the index (each seen by it, or published while it
-- ran), records fetched, drift, deletes.
local f = redis.call('HMGET', meta, 'pass_started', 'pass_fetched', 'pass_drift')
redis.call('HSET', state, feed .. ':pass_started', f[1], feed .. ':pass_finished', now,
           feed .. ':pass_seen', count, feed .. ':pass_fetched', f[2], feed .. ':pass_drift', f[3],
           feed .. ':pass_deleted', total)
redis.call('HDEL', meta, 'pass', 'sweep', 'pass_cursor', 'pass_started', 'pass_fetched',
           'pass_drift', 'pass_deleted')
return {0, 1, deleted, pos}
"""
)
