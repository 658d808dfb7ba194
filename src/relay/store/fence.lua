-- Fencing check, prepended to every script that writes a shard's keys.
-- A worker may write a shard only while it holds the shard's lease with the token it was
-- granted; a worker that was paused or partitioned past its lease gets FENCED and writes nothing.
local function fenced(lease_key, owner, token)
  local held = redis.call('HMGET', lease_key, 'owner', 'token')
  if held[1] ~= owner or held[2] ~= token then
    return redis.error_reply('FENCED shard lease is not held by this worker')
  end
  return nil
end
