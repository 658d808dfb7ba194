-- Drain tick of one shard (rule 3), for one page of the batched set that the caller read with
-- SSCAN: every task with a batch and a known status below STOPPED gets a synthetic task change
-- with its known status (and the task's latest timestamps, as upstream's ticker copies them),
-- carrying the whole batch. Tasks with no known status, or at/after STOPPED, keep their batch
-- until a task event or retention. Every key is passed in KEYS (Redis Cluster rules); a task
-- that left the batched set since the caller's read is skipped.
-- KEYS: 1 lease, 2 batched set, 3 pending zset, 4 sequence counter, 5 active zset,
--       then 3 per task: state hash, batch list, outbox list
-- ARGV: 1 owner, 2 token, 3 retention seconds, 4 number S of task statuses,
--       5..4+S task status names in order, then one ordering key per task
-- Returns the ordering keys that got an outbox entry.
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local ttl = tonumber(ARGV[3]) * 2
local statuses = tonumber(ARGV[4])
local stopped = statuses - 1 -- index of STOPPED, the last status
local first_key = 5 + statuses
local now = redis.call('TIME')[1]
local woken = {}
for i = first_key, #ARGV do
  local key = ARGV[i]
  local k = 5 + (i - first_key) * 3
  local state_key, batch_key, outbox_key = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local state = redis.call('HMGET', state_key, 'k', 'cl', 'ps', 'pt', 'es')
  local known = tonumber(state[1] or '')
  if known and known < stopped and redis.call('SISMEMBER', KEYS[2], key) == 1 then
    local items = redis.call('LRANGE', batch_key, 0, -1)
    redis.call('DEL', batch_key)
    redis.call('SREM', KEYS[2], key)
    if #items > 0 then
      -- Named by the shard-wide sequence number, like every outbox entry (see intake.lua).
      local n = string.format('%d', redis.call('INCR', KEYS[4]))
      local change = { cluster = state[2] or '', task = key, status = ARGV[5 + known], reason = '',
        pullStartedAt = state[3] or nil, pullStoppedAt = state[4] or nil, executionStoppedAt = state[5] or nil }
      redis.call('RPUSH', outbox_key, '{"n":' .. n .. ',"id":' .. cjson.encode('drain:' .. n)
        .. ',"e":{"task":' .. cjson.encode(change) .. '},"b":[' .. table.concat(items, ',') .. ']}')
      redis.call('EXPIRE', outbox_key, ttl)
      redis.call('ZADD', KEYS[3], 'NX', n, key)
      redis.call('ZADD', KEYS[5], now, key)
      woken[#woken + 1] = key
    end
  end
end
return woken
