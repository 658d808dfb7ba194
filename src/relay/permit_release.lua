-- Returns a permit and wakes the first queued worker (one wake per release, not every
-- waiter); also takes a worker out of the queue when it no longer waits.
-- KEYS: 1 permits zset, 2 queue zset, 3 queue liveness zset (see permit_acquire.lua)
-- ARGV: 1 permit id ('' for none), 2 release channel, 3 worker leaving the queue ('' for none)
-- Returns 1 if the permit was held.
if #KEYS ~= 3 or #ARGV ~= 3 then return redis.error_reply('ERR permit_release.lua: wants 3 keys, 3 arguments') end
local removed = 0
if ARGV[1] ~= '' then removed = redis.call('ZREM', KEYS[1], ARGV[1]) end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if first then redis.call('PUBLISH', ARGV[2], 'wake:' .. first) end
return removed
