-- Retention (rule 11): drops the state of tasks idle for longer than the retention, and
-- reports how many stored events went with it, so every such drop is counted.
-- KEYS: 1 lease, 2 active zset, 3 pending zset, 4 batched set
-- ARGV: 1 owner, 2 token, 3 shard key prefix, 4 retention seconds, 5 most tasks per call
-- Returns {tasks dropped, events dropped}.
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local prefix = ARGV[3]
local cutoff = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[4])
local idle = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[5]))
local events = 0
for _, key in ipairs(idle) do
  events = events + redis.call('LLEN', prefix .. 'o:' .. key) + redis.call('LLEN', prefix .. 'b:' .. key)
  redis.call('DEL', prefix .. 't:' .. key, prefix .. 'b:' .. key, prefix .. 'o:' .. key, prefix .. 'd:' .. key)
  redis.call('ZREM', KEYS[2], key)
  redis.call('ZREM', KEYS[3], key)
  redis.call('SREM', KEYS[4], key)
end
return { #idle, events }
