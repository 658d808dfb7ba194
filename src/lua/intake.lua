-- Intake of a batch of one shard's validated events, in delivery order, atomically: dedupe,
-- known status, batch or outbox. One script per batch (not per event), so the fence, the
-- clock and the per-task TTL refreshes are paid once per batch and task, not once per event.
-- KEYS: 1 lease, 2 pending zset, 3 batched set, 4 active zset, 5 sequence counter,
--       then 4 per event: dedupe set, task state hash, batch list, outbox list
-- ARGV: 1 owner, 2 token, 3 retention seconds, 4 largest batch,
--       then 6 per event: eventId, type, ordering key, stored form,
--       known task status index or '', cluster
-- Returns one code per event: 0 = duplicate (already taken), 1 = batched, 2 = appended to the
-- outbox, 3 = refused: the batch is full (nothing written; the caller dead-letters it).
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local max_batch = tonumber(ARGV[4])
local results = {}
-- Ordering key -> offset of its keys in KEYS, for one activity and TTL refresh per task.
local touched = {}

for e = 0, (#ARGV - 4) / 6 - 1 do
  local k, a = 5 + e * 4, 4 + e * 6
  local dedupe, state, batch, outbox = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local id, kind, key = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local stored, status, cluster = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local batches = kind == 'container' or kind == 'managedAgent'

  local result
  if redis.call('SISMEMBER', dedupe, id) == 1 then
    -- A redelivered message (same eventId) changes nothing.
    result = 0
  elseif batches and redis.call('LLEN', batch) >= max_batch then
    result = 3
  else
    redis.call('SADD', dedupe, id)
    -- Known status only moves forward: a task lifecycle never goes back, and a stale
    -- taskStatus on a late container event must not make a stopped task drainable again.
    if status ~= '' and tonumber(status) > tonumber(redis.call('HGET', state, 'k') or '-1') then
      redis.call('HSET', state, 'k', status, 'cl', cluster)
    else
      redis.call('HSET', state, 'cl', cluster)
    end
    if batches then
      redis.call('RPUSH', batch, stored)
      redis.call('SADD', KEYS[3], key)
      result = 1
    else
      -- A task event takes the whole batch (rule 2); attachment events never do (FIX of upstream).
      local items = {}
      if kind == 'task' then
        items = redis.call('LRANGE', batch, 0, -1)
        redis.call('DEL', batch)
        redis.call('SREM', KEYS[3], key)
      end
      redis.call('RPUSH', outbox, stored .. ',"b":[' .. table.concat(items, ',') .. ']}')
      redis.call('ZADD', KEYS[2], 'NX', redis.call('INCR', KEYS[5]), key)
      result = 2
    end
    touched[key] = k
  end
  results[#results + 1] = result
end

-- Retention: the sweeper drops (and counts) idle tasks after 1x; the TTL is only a safety net.
local now = redis.call('TIME')[1]
local ttl = tonumber(ARGV[3]) * 2
for key, k in pairs(touched) do
  redis.call('ZADD', KEYS[4], now, key)
  for i = 1, 4 do
    redis.call('EXPIRE', KEYS[k + i], ttl)
  end
end
return results
