-- Drain tick of one shard (rule 3): every task with a batch and a known status below STOPPED
-- gets a synthetic task change with its known status, carrying the whole batch.
-- Tasks with no known status, or at/after STOPPED, keep their batch until a task event or
-- retention. Per-task keys are built from the shard prefix: they share the shard's hash tag.
-- KEYS: 1 lease, 2 batched set, 3 pending zset, 4 sequence counter, 5 active zset
-- ARGV: 1 owner, 2 token, 3 shard key prefix, 4 retention seconds, 5.. task status names in order
-- Returns the ordering keys that got an outbox entry.
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local prefix = ARGV[3]
local ttl = tonumber(ARGV[4]) * 2
local stopped = #ARGV - 5 -- index of STOPPED, the last status
local now = redis.call('TIME')[1]
local woken = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local state_key = prefix .. 't:' .. key
  local state = redis.call('HMGET', state_key, 'k', 'cl')
  local known = tonumber(state[1] or '')
  if known and known < stopped then
    local batch_key = prefix .. 'b:' .. key
    local items = redis.call('LRANGE', batch_key, 0, -1)
    redis.call('DEL', batch_key)
    redis.call('SREM', KEYS[2], key)
    if #items > 0 then
      local id = 'drain:' .. redis.call('HINCRBY', state_key, 'dseq', 1)
      local change = { cluster = state[2] or '', task = key, status = ARGV[5 + known], reason = '' }
      local outbox_key = prefix .. 'o:' .. key
      redis.call('RPUSH', outbox_key, '{"id":' .. cjson.encode(id) .. ',"e":{"task":' .. cjson.encode(change)
        .. '},"b":[' .. table.concat(items, ',') .. ']}')
      redis.call('EXPIRE', outbox_key, ttl)
      redis.call('ZADD', KEYS[3], 'NX', redis.call('INCR', KEYS[4]), key)
      redis.call('ZADD', KEYS[5], now, key)
      woken[#woken + 1] = key
    end
  end
end
return woken
