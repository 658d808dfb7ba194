-- Extends a shard lease held with this token. KEYS: 1 lease   ARGV: 1 owner, 2 token, 3 lease ms
-- Returns 1 if renewed, 0 if the lease was lost (expired or taken over).
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
