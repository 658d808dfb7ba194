-- Intake of a batch of one shard's validated events, in delivery order, atomically: dedupe,
-- known status, batch or outbox. One script per batch (not per event), so the fence, the
-- clock and the per-task TTL refreshes are paid once per batch and task, not once per event.
-- KEYS: 1 lease, 2 pending zset, 3 batched set, 4 active zset, 5 sequence counter,
--       then 4 per event: recent ids zset, task state hash, batch list, outbox list
-- ARGV: 1 owner, 2 token, 3 retention seconds, 4 largest batch, 5 recent ids kept per key,
--       then 9 per event: eventId, type, ordering key, stored form,
--       known task status index or '', cluster, pullStartedAt, pullStoppedAt,
--       executionStoppedAt (RFC 3339 or '')
-- Returns one code per event: 0 = duplicate (already taken), 1 = batched, 2 = appended to the
-- outbox, 3 = refused: the batch is full (nothing written; the caller dead-letters it).
-- A call laid out otherwise would be misread event by event: refuse it whole.
local events = (#ARGV - 5) / 9
if events < 0 or events ~= math.floor(events) or #KEYS ~= 5 + 4 * events then
  return redis.error_reply(string.format(
    'ERR intake.lua: %d keys and %d arguments are not 5 + 4 and 5 + 9 per event', #KEYS, #ARGV))
end
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local max_batch = tonumber(ARGV[4])
local keep_ids = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1])
-- Microseconds: orders the ids of one key by arrival, also within one batch.
local now_us = now * 1000000 + tonumber(t[2])
local results = {}
-- Ordering key -> offset of its keys in KEYS, for one activity and TTL refresh per task.
local touched = {}
local times = { 'ps', 'pt', 'es' }

for e = 0, events - 1 do
  local k, a = 5 + e * 4, 5 + e * 9
  local ids, state, batch, outbox = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local id, kind, key = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local stored, status, cluster = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local batches = kind == 'container' or kind == 'managedAgent'

  local result
  if redis.call('ZSCORE', ids, id) then
    -- A redelivered message (same eventId) changes nothing. Only the most recent ids of a key
    -- are kept: a redelivery comes back within the broker's unacknowledged window, far fewer.
    result = 0
  elseif batches and redis.call('LLEN', batch) >= max_batch then
    result = 3
  else
    redis.call('ZADD', ids, string.format('%.0f', now_us + e), id)
    -- Known status only moves forward: a task lifecycle never goes back, and a stale
    -- taskStatus on a late container event must not make a stopped task drainable again.
    if status ~= '' and tonumber(status) > tonumber(redis.call('HGET', state, 'k') or '-1') then
      redis.call('HSET', state, 'k', status, 'cl', cluster)
    else
      redis.call('HSET', state, 'cl', cluster)
    end
    -- The task's latest timestamps, which drained changes carry as upstream's ticker does.
    for i = 1, 3 do
      if ARGV[a + 6 + i] ~= '' then
        redis.call('HSET', state, times[i], ARGV[a + 6 + i])
      end
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
      -- The shard-wide sequence number names the entry: unique for ever (the counter is never
      -- deleted), so a retried completion can only ever remove the entry it was meant for.
      local n = redis.call('INCR', KEYS[5])
      redis.call('RPUSH', outbox, '{"n":' .. string.format('%d', n) .. ',' .. string.sub(stored, 2)
        .. ',"b":[' .. table.concat(items, ',') .. ']}')
      redis.call('ZADD', KEYS[2], 'NX', n, key)
      result = 2
    end
    touched[key] = k
  end
  results[#results + 1] = result
end

-- Always write something: a WAIT after this script then also covers what an earlier try of
-- the same batch wrote (replication is one stream), even when every event is a duplicate now.
if next(touched) == nil then
  redis.call('INCR', KEYS[5])
end

-- Retention: the sweeper drops (and counts) idle tasks after 1x; the TTL is only a safety net.
local ttl = tonumber(ARGV[3]) * 2
for key, k in pairs(touched) do
  -- Keep only the most recent ids: trimmed once per key and batch, not per event.
  redis.call('ZREMRANGEBYRANK', KEYS[k + 1], 0, -keep_ids - 1)
  redis.call('ZADD', KEYS[4], now, key)
  for i = 1, 4 do
    redis.call('EXPIRE', KEYS[k + i], ttl)
  end
end
return results
