-- Gives a shard lease back at once (clean shutdown), only if still held with this token.
-- KEYS: 1 lease   ARGV: 1 owner, 2 token   Returns 1 if released.
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return 0
end
return redis.call('DEL', KEYS[1])
