-- Gives a shard lease back at once (clean shutdown), only if still held with this token, and
-- records the token as released cleanly (the next owner need not wait, see lease_acquire.lua).
-- Announces it on the membership channel so the shard's next owner takes it at once.
-- KEYS: 1 lease, 2 last token released cleanly
-- ARGV: 1 owner, 2 token, 3 membership channel   Returns 1 if released.
local held = redis.call('HMGET', KEYS[1], 'owner', 'token')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'released')
return 1
