-- Marks a task active while its ECS calls keep failing: rule 8 retries it for ever, so the
-- retention sweep must not take it for idle, nor may its keys' TTL (the safety net) run out.
-- KEYS: 1 lease, 2 active zset, 3 state hash, 4 batch list, 5 outbox list, 6 recent ids zset
-- ARGV: 1 owner, 2 token, 3 ordering key, 4 retention seconds
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

redis.call('ZADD', KEYS[2], redis.call('TIME')[1], ARGV[3])
local ttl = tonumber(ARGV[4]) * 2
for i = 3, 6 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
return 1
