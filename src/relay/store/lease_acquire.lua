-- Takes a shard lease if it is free (or already ours), granting a new fencing token.
-- The token counter never expires, so a later owner always has a larger token.
-- KEYS: 1 lease hash, 2 fencing counter, 3 last token released cleanly
-- ARGV: 1 owner, 2 lease ms
-- The hash also keeps `since` (ms, Redis TIME) for `status`.
-- Returns {token, lapsed}: token 0 when another worker holds the lease; lapsed 1 when the
-- previous owner did not release it (crashed, paused or cut off: a call of its may still be
-- on the wire, so the new owner waits one call timeout before it calls ECS for the shard).
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  return { 0, 0 }
end
local previous = redis.call('GET', KEYS[2])
local lapsed = 0
if previous and previous ~= redis.call('GET', KEYS[3]) then
  lapsed = 1
end
local token = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'since', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return { token, lapsed }
