-- Returns a permit and wakes the first live queued worker (one wake per release, not every
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
-- Workers that stopped asking (crashed, frozen) leave first: the wake goes to one that waits.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], gone)
  redis.call('ZREM', KEYS[3], gone)
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if first then redis.call('PUBLISH', ARGV[2], 'wake:' .. first) end
return removed
