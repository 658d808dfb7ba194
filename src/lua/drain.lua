-- Drain tick of one shard (rule 3): every task with a batch and a known status below STOPPED
-- gets a synthetic task change with its known status, carrying the whole batch.
-- Tasks with no known status, or at/after STOPPED, keep their batch until a task event or
-- retention. Per-task keys are built from the shard prefix: they share the shard's hash tag.
-- One call handles one SSCAN page of the batched set, so a shard with many batched tasks
-- never blocks Redis for long; the caller repeats with the returned cursor until it is "0".
-- KEYS: 1 lease, 2 batched set, 3 pending zset, 4 sequence counter, 5 active zset
-- ARGV: 1 owner, 2 token, 3 shard key prefix, 4 retention seconds, 5 SSCAN cursor,
--       6 SSCAN count, 7.. task status names in order
-- Returns {next cursor, the ordering keys that got an outbox entry}.
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local prefix = ARGV[3]
local ttl = tonumber(ARGV[4]) * 2
local stopped = #ARGV - 7 -- index of STOPPED, the last status
local now = redis.call('TIME')[1]
local woken = {}
local page = redis.call('SSCAN', KEYS[2], ARGV[5], 'COUNT', ARGV[6])
for _, key in ipairs(page[2]) do
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
      local change = { cluster = state[2] or '', task = key, status = ARGV[7 + known], reason = '' }
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
return { page[1], woken }
