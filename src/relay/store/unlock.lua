-- Releases a simple lock only if this caller still holds it (it may have expired and been
-- taken by another). KEYS: 1 lock   ARGV: 1 holder   Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
