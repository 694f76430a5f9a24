-- tierlimit's operator state (the admin API's changes), shared by every
-- instance. KEYS[1]: the state (a hash: one field per change, JSON);
-- KEYS[2]: its version (moved by every write). Both carry the hash tag
-- {admin}: one Cluster slot.
-- ARGV[1]: 'write', 'load' or 'version'.
-- write: ARGV[2] the channel to publish on, then triples: field, 'set' or
--   'del', value. Returns the new version (and publishes it).
-- load: returns {version, field_1, value_1, ...}.
-- version: returns the version ('0' before any write).
local mode = ARGV[1]
if mode == 'write' then
  local i = 3
  while i + 2 <= #ARGV do
    if ARGV[i + 1] == 'set' then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    else
      redis.call('HDEL', KEYS[1], ARGV[i])
    end
    i = i + 3
  end
  local v = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[2], tostring(v))
  return tostring(v)
end
local v = redis.call('GET', KEYS[2]) or '0'
if mode == 'version' then
  return v
end
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, v)
return all
