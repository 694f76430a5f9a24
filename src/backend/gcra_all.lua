-- tierlimit's GCRA over several limits at once, all or nothing, with the
-- request's concurrency leases: governor's arithmetic in microseconds. Every
-- key shares one hash tag (the owner), so on Redis Cluster they live in one
-- slot and this is one atomic call.
-- KEYS[1..k]: the rate buckets; KEYS[k+1..]: the lease sets (sorted sets of
-- lease ids scored by their expiry, us).
-- ARGV[1]: now (us; empty: Redis TIME); ARGV[2]: k; ARGV[3]: this request's
-- lease id; ARGV[4]: the lease TTL (us); then per rate key: interval (us),
-- max, reserve, cost; then per lease set: max.
-- Returns {1, remaining_1, ..., remaining_k, held_1, ...} when every limit
-- admits the request and every lease set has room (it is counted in all and
-- holds a lease of each: held counts include it); {0, retry_1, ..., retry_k}
-- (us; 0 for a limit that admits it) when a rate limit refuses it; {2,
-- capacity_1, ..., capacity_k, held_1, ...} when a lease set is full. A
-- refusal counts nothing and takes no lease.
local now = now_us(ARGV[1])
local k = tonumber(ARGV[2])
local member = ARGV[3]
local ttl = tonumber(ARGV[4])
local m = #KEYS - k
local tats, out = {}, {}
local refused = false
for i = 1, k do
  local b = 4 + 4 * (i - 1)
  local t = tonumber(ARGV[b + 1])
  local max = tonumber(ARGV[b + 2])
  local reserve = tonumber(ARGV[b + 3])
  local n = tonumber(ARGV[b + 4])
  local tau = t * (max - 1)
  local add = t * (n - 1)
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if not tat then tat = now end
  tats[i] = tat
  local earliest = tat + add + reserve * t - tau
  if n + reserve > max then
    -- Only the reserve (or less) could ever be left: a whole window.
    refused = true
    out[i] = t * max
  elseif now < earliest then
    refused = true
    out[i] = earliest - now
  else
    out[i] = 0
  end
end
if refused then
  table.insert(out, 1, 0)
  return out
end
local held, full = {}, false
for j = 1, m do
  local key = KEYS[k + j]
  local max = tonumber(ARGV[4 + 4 * k + j])
  -- Leases of instances that stopped renewing them are gone.
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  held[j] = redis.call('ZCARD', key)
  if held[j] >= max then full = true end
end
if full then
  for i = 1, k do
    local b = 4 + 4 * (i - 1)
    local t = tonumber(ARGV[b + 1])
    local max = tonumber(ARGV[b + 2])
    out[i] = math.floor(math.min(now + t * max - math.max(tats[i], now), t * max) / t)
  end
  for j = 1, m do out[k + j] = held[j] end
  table.insert(out, 1, 2)
  return out
end
for i = 1, k do
  local b = 4 + 4 * (i - 1)
  local t = tonumber(ARGV[b + 1])
  local max = tonumber(ARGV[b + 2])
  local n = tonumber(ARGV[b + 4])
  local tau = t * (max - 1)
  local add = t * (n - 1)
  local nxt = math.max(tats[i], now) + t + add
  redis.call('SET', KEYS[i], string.format('%d', nxt), 'PX', string.format('%d', math.ceil((nxt - now) / 1000)))
  out[i] = math.floor(math.min(now + tau + t - nxt, tau + t) / t)
end
for j = 1, m do
  local key = KEYS[k + j]
  redis.call('ZADD', key, string.format('%d', now + ttl), member)
  redis.call('PEXPIRE', key, string.format('%d', math.ceil(ttl / 1000)))
  out[k + j] = held[j] + 1
end
table.insert(out, 1, 1)
return out
