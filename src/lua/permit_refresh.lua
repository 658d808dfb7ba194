-- Extends a permit still held. KEYS: 1 permits zset   ARGV: 1 permit id, 2 lease ms
-- Returns 1 if extended, 0 if the permit had expired and was reaped (it is not re-created).
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
