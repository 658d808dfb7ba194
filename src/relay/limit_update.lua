-- Adaptive concurrency (AIMD): the fleet's effective limit of ECS calls in flight, one hash
-- for every worker. Each worker reports what its calls met since its last report.
-- KEYS: 1 limit hash {limit, changed = ms of the last change, decreased = ms of the last
--       decrease, throttled = ms of the last throttled call}
-- ARGV: 1 ceiling, 2 minimum, 3 window ms, 4 throttled calls, 5 healthy calls
-- Returns the effective limit. Times are Redis TIME, so worker clocks do not matter.
if #KEYS ~= 1 or #ARGV ~= 5 then return redis.error_reply('ERR limit_update.lua: wants 1 keys, 5 arguments') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ceiling, minimum, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local throttled, healthy = tonumber(ARGV[4]), tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'limit', 'changed', 'decreased', 'throttled')
-- Clamped on every read: a redeploy may have changed the ceiling or the minimum.
local limit = math.min(ceiling, math.max(minimum, tonumber(state[1]) or ceiling))
-- Never in the future: after a failover to a host whose clock is behind, stored times past
-- `now` would hold every change back until that clock caught up.
local changed = math.min(now, tonumber(state[2]) or 0)
local decreased = math.min(now, tonumber(state[3]) or 0)
local last_throttle = math.min(now, tonumber(state[4]) or 0)
if throttled == 0 and healthy == 0 then
  -- Nothing to report (no calls): only read, so an idle fleet's hash can expire.
  return limit
end
if throttled > 0 then
  last_throttle = now
  -- Multiplicative decrease, at most once per window since the last decrease: the calls
  -- throttled by one overload are answered together and must count once. A step up just
  -- before does not delay it: that step is what overloaded ECS.
  if now - decreased >= window then
    limit = math.max(minimum, math.ceil(limit / 2))
    changed, decreased = now, now
  end
elseif healthy > 0 and limit < ceiling and now - changed >= window
    and now - last_throttle >= window then
  -- Additive increase: +1 per window in which calls went through and none was throttled.
  limit = limit + 1
  changed = now
end
redis.call('HSET', KEYS[1], 'limit', limit, 'changed', changed, 'decreased', decreased,
  'throttled', last_throttle)
-- A fleet without calls for 60 windows forgets the throttling: nothing measured it since.
redis.call('PEXPIRE', KEYS[1], window * 60)
return limit
