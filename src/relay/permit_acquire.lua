-- Fleet-wide semaphore: a sorted set of permit ids scored by lease expiry (ms, Redis TIME,
-- so worker clocks do not matter). Expired permits (a crashed worker's) are reaped first.
-- KEYS: 1 permits zset   ARGV: 1 permit id, 2 limit, 3 lease ms
-- Returns {1, 0} when granted, else {0, ms until the earliest permit expires}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return { 1, 0 }
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return { 0, math.max(1, tonumber(first[2]) - now) }
