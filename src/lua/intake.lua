-- Intake of one validated event, atomically: dedupe, known status, batch or outbox.
-- KEYS: 1 lease, 2 dedupe set, 3 task state hash, 4 batch list, 5 outbox list,
--       6 pending zset, 7 batched set, 8 active zset, 9 sequence counter
-- ARGV: 1 owner, 2 token, 3 eventId, 4 type, 5 ordering key, 6 stored form,
--       7 known task status index or '', 8 cluster, 9 retention seconds, 10 largest batch
-- Returns 0 = duplicate (already taken), 1 = batched, 2 = appended to the outbox,
--         3 = refused: the batch is full (nothing written; the caller dead-letters it).
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local kind, key = ARGV[4], ARGV[5]
local batches = kind == 'container' or kind == 'managedAgent'

-- A redelivered message (same eventId) changes nothing.
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 1 then
  return 0
end
if batches and redis.call('LLEN', KEYS[4]) >= tonumber(ARGV[10]) then
  return 3
end
redis.call('SADD', KEYS[2], ARGV[3])
-- Known status only moves forward: a task lifecycle never goes back, and a stale taskStatus
-- on a late container event must not make a stopped task drainable again.
if ARGV[7] ~= '' then
  local known = tonumber(redis.call('HGET', KEYS[3], 'k') or '-1')
  if tonumber(ARGV[7]) > known then
    redis.call('HSET', KEYS[3], 'k', ARGV[7])
  end
end
redis.call('HSET', KEYS[3], 'cl', ARGV[8])

local result
if batches then
  redis.call('RPUSH', KEYS[4], ARGV[6])
  redis.call('SADD', KEYS[7], key)
  result = 1
else
  -- A task event takes the whole batch (rule 2); attachment events never do (FIX of upstream).
  local items = {}
  if kind == 'task' then
    items = redis.call('LRANGE', KEYS[4], 0, -1)
    redis.call('DEL', KEYS[4])
    redis.call('SREM', KEYS[7], key)
  end
  redis.call('RPUSH', KEYS[5], ARGV[6] .. ',"b":[' .. table.concat(items, ',') .. ']}')
  redis.call('ZADD', KEYS[6], 'NX', redis.call('INCR', KEYS[9]), key)
  result = 2
end

-- Retention: the sweeper drops (and counts) idle tasks after 1x; the TTL is only a safety net.
redis.call('ZADD', KEYS[8], redis.call('TIME')[1], key)
local ttl = tonumber(ARGV[9]) * 2
for i = 2, 5 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
return result
