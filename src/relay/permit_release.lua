-- Returns a permit and wakes waiting workers through pub/sub (no polling while waiting).
-- KEYS: 1 permits zset   ARGV: 1 permit id, 2 release channel   Returns 1 if it was held.
if #KEYS ~= 1 or #ARGV ~= 2 then return redis.error_reply('ERR permit_release.lua: wants 1 keys, 2 arguments') end
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], '1')
return removed
