-- Takes a shard lease if it is free (or already ours), granting a new fencing token.
-- The token counter never expires, so a later owner always has a larger token.
-- KEYS: 1 lease hash, 2 fencing counter   ARGV: 1 owner, 2 lease ms
-- The hash also keeps `since` (ms, Redis TIME) for `status`.
-- Returns the token, or 0 when another worker holds the lease.
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  return 0
end
local token = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'since', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
