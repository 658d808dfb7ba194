-- Worker registry: members scored by heartbeat expiry (ms, Redis TIME). Registers or renews
-- this worker, forgets workers whose heartbeat lapsed, and returns the live set, which every
-- worker divides the shards over.
-- A worker that is new to the set is announced on the membership channel.
-- KEYS: 1 workers zset   ARGV: 1 worker id, 2 lease ms, 3 membership channel
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[3], 'joined')
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
