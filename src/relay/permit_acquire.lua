-- Fleet-wide semaphore: a sorted set of permit ids scored by lease expiry (ms, Redis TIME,
-- so worker clocks do not matter). Expired permits (a crashed worker's) are reaped first.
-- KEYS: 1 permits zset, 2 adaptive limit hash (read only when adaptive)
-- ARGV: 1 permit id, 2 ceiling, 3 lease ms, 4 '1' when adaptive
-- Returns {1, 0} when granted, else {0, ms until the earliest permit expires}.
if #KEYS ~= 2 or #ARGV ~= 4 then return redis.error_reply('ERR permit_acquire.lua: wants 2 keys, 4 arguments') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
if ARGV[4] == '1' then
  -- The fleet's effective limit (limit_update.lua), never above the ceiling; absent means
  -- not lowered.
  limit = math.min(limit, tonumber(redis.call('HGET', KEYS[2], 'limit')) or limit)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return { 1, 0 }
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not first[2] then
  -- None held, yet the limit admits none: cannot happen with a limit >= 1; ask again soon.
  return { 0, 100 }
end
return { 0, math.max(1, tonumber(first[2]) - now) }
