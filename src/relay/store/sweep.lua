-- Retention (rule 11): drops the state of tasks idle for longer than the retention, and
-- reports how many stored events went with it, so every such drop is counted. The caller
-- reads the candidates (the oldest members of the active zset); each is checked again here,
-- so a task that became active since that read is kept. Every key is passed in KEYS.
-- KEYS: 1 lease, 2 active zset, 3 pending zset, 4 batched set,
--       then 4 per task: state hash, batch list, outbox list, recent ids zset
-- ARGV: 1 owner, 2 token, 3 retention seconds, then one ordering key per task
-- Returns {tasks dropped, events dropped}.
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local cutoff = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[3])
local tasks, events = 0, 0
for i = 4, #ARGV do
  local key = ARGV[i]
  local k = 4 + (i - 4) * 4
  local last = tonumber(redis.call('ZSCORE', KEYS[2], key) or '')
  if last and last <= cutoff then
    events = events + redis.call('LLEN', KEYS[k + 3]) + redis.call('LLEN', KEYS[k + 2])
    redis.call('DEL', KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])
    redis.call('ZREM', KEYS[2], key)
    redis.call('ZREM', KEYS[3], key)
    redis.call('SREM', KEYS[4], key)
    tasks = tasks + 1
  end
end
return { tasks, events }
