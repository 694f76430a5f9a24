-- tierlimit's concurrency leases after admission (gcra_all.lua takes them).
-- KEYS: one request's lease sets (one hash tag: one Cluster slot).
-- ARGV[1]: 'release', 'renew' or 'peek'; ARGV[2]: now (us; empty: Redis
-- TIME); ARGV[3]: the lease TTL (us); ARGV[4]: the lease id.
-- release: removes the lease from every set; returns how many held it.
-- renew: moves the lease's expiry to now + TTL where it is still held (a
-- lease already expired is not taken again); returns how many held it.
-- peek: returns the leases held now in KEYS[1], counting nothing.
local mode = ARGV[1]
local now = now_us(ARGV[2])
if mode == 'peek' then
  return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf')
end
local ttl = tonumber(ARGV[3])
local member = ARGV[4]
local found = 0
for _, key in ipairs(KEYS) do
  if mode == 'release' then
    found = found + redis.call('ZREM', key, member)
  else
    local score = redis.call('ZSCORE', key, member)
    if score and tonumber(score) > now then
      redis.call('ZADD', key, 'XX', string.format('%d', now + ttl), member)
      redis.call('PEXPIRE', key, string.format('%d', math.ceil(ttl / 1000)))
      found = found + 1
    end
  end
end
return found
