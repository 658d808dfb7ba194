-- Fleet-wide semaphore: a sorted set of permit ids scored by lease expiry (ms, Redis TIME,
-- so worker clocks do not matter). Expired permits (a crashed worker's) are reaped first.
-- Workers that found no free permit wait in a FIFO queue: a free permit goes to the queue's
-- first worker, so a busy worker cannot keep the fleet's permits from a waiting one (rule 12).
-- A worker is queued once, however many of its calls wait; it keeps its place while it asks
-- again at least every few seconds, and is reaped when it stops asking (crashed, frozen).
-- KEYS: 1 permits zset, 2 adaptive limit hash (read only when adaptive),
--       3 queue zset (worker -> place, a counter: no clock, so a failover to a host whose
--       clock is behind cannot put a newcomer ahead), 4 queue liveness zset (worker -> expiry ms)
-- ARGV: 1 permit id, 2 ceiling, 3 lease ms, 4 '1' when adaptive, 5 worker, 6 queue ttl ms,
--       7 release channel
-- Returns {1, 0} when granted, else {0, ms to wait at most before asking again}.
-- Publishes 'wake:<worker>' to the next queued worker while permits are left over, and
-- 'queued:<worker>' when a worker had to wait (the others keep only their share by hand-off).
if #KEYS ~= 4 or #ARGV ~= 7 then return redis.error_reply('ERR permit_acquire.lua: wants 4 keys, 7 arguments') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
if ARGV[4] == '1' then
  -- The fleet's effective limit (limit_update.lua), never above the ceiling; absent means
  -- not lowered.
  limit = math.min(limit, tonumber(redis.call('HGET', KEYS[2], 'limit')) or limit)
end
local worker = ARGV[5]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  redis.call('ZREM', KEYS[3], gone)
  redis.call('ZREM', KEYS[4], gone)
end
local free = limit - redis.call('ZCARD', KEYS[1])
if free > 0 then
  -- Queued workers go first, in their order; one not queued only after all of them.
  local ahead = redis.call('ZRANK', KEYS[3], worker) or redis.call('ZCARD', KEYS[3])
  if ahead < free then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
    redis.call('ZREM', KEYS[3], worker)
    redis.call('ZREM', KEYS[4], worker)
    if free > 1 then
      local next = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
      if next then redis.call('PUBLISH', ARGV[7], 'wake:' .. next) end
    end
    return { 1, 0 }
  end
end
if not redis.call('ZSCORE', KEYS[3], worker) then
  local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2]
  redis.call('ZADD', KEYS[3], (tonumber(last) or 0) + 1, worker)
end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), worker)
redis.call('PUBLISH', ARGV[7], 'queued:' .. worker)
if free > 0 then
  -- Free permits, promised to workers ahead in the queue (woken already): ask again soon.
  return { 0, 100 }
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return { 0, math.max(1, tonumber(first[2]) - now) }
