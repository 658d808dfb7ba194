-- Takes a shard lease if it is free (or already ours), granting a new fencing token.
-- The token counter never expires, so a later owner always has a larger token.
-- KEYS: 1 lease hash, 2 fencing counter   ARGV: 1 owner, 2 lease ms
-- Returns the token, or 0 when another worker holds the lease.
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
