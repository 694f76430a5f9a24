-- tierlimit's check: one request against every limit that applies to it,
-- all or nothing, with its concurrency leases. Every key shares one hash
-- tag (the owner), so on Redis Cluster they live in one slot and this is
-- one atomic call.
-- ARGV[1]: 'check' or 'peek'.
-- check: KEYS[1..k]: the rate buckets; KEYS[k+1..]: the lease sets (sorted
--   sets of lease ids scored by their expiry, us). ARGV[2]: now (us;
--   empty: Redis TIME); ARGV[3]: k; ARGV[4]: this request's lease id;
--   ARGV[5]: the lease TTL (us); then per rate key: interval (us), max,
--   reserve, cost (a calendar limit: interval 0); then per lease set: max;
--   then per calendar limit, in order: its period's start, end, the next
--   period's end and the layer's time (us; see calendar.lua).
--   Returns {1, remaining_1, ..., remaining_k, held_1, ...} when every
--   limit admits the request and every lease set has room (it is counted
--   in all and holds a lease of each: held counts include it); {0,
--   retry_1, ..., retry_k} (us; 0 for a limit that admits it), then what
--   each calendar limit has left, when a rate limit refuses it; {2, capacity_1, ..., capacity_k, held_1, ...} when a
--   lease set is full. A refusal counts nothing and takes no lease. A
--   calendar limit's remaining and capacity are as cal_answer writes them.
-- peek: KEYS[1]: a rate bucket. ARGV[2]: now; ARGV[3]: interval (us);
--   ARGV[4]: max (a calendar limit: interval 0, then its bounds). Returns
--   {1, capacity} with room, else {0, retry_us}: what a check of one unit
--   would answer, counting nothing.
local now = now_us(ARGV[2])
if ARGV[1] == 'peek' then
  local t, max = tonumber(ARGV[3]), tonumber(ARGV[4])
  if t == 0 then
    local s0, e0, ne, rnow = cal_bounds(4, 1)
    local s, e, at = cal_period(s0, e0, ne, rnow, now)
    local used, ks, ke = cal_used(KEYS[1], s, e)
    if used < max then return {1, cal_answer(max - used, ks, s0)} end
    return {0, math.max(1, ke - at)}
  end
  local tat = gcra_tat(KEYS[1], now)
  -- What the top could take, and the slots batches gave back below it.
  local room = math.min(max, gcra_capacity(tat, now, t, max) + holes_room(KEYS[1], now, t, max))
  if room > 0 then return {1, room} end
  return {0, gcra_wait(tat, now, t, max, 1, 0)}
end
local k = tonumber(ARGV[3])
local member = ARGV[4]
local ttl = tonumber(ARGV[5])
local m = #KEYS - k
local function param(i, j) return tonumber(ARGV[5 + 4 * (i - 1) + j]) end
local tats, out, holes = {}, {}, {}
-- Per calendar charge: {used, its period's start, end, the time, s0}.
local cal, ci = {}, 0
local refused = false
for i = 1, k do
  if param(i, 1) == 0 then
    ci = ci + 1
    local s0, e0, ne, rnow = cal_bounds(5 + 4 * k + m, ci)
    local s, e, at = cal_period(s0, e0, ne, rnow, now)
    local used, ks, ke = cal_used(KEYS[i], s, e)
    cal[i] = {used, ks, ke, at, s0}
    out[i] = 0
    if used + param(i, 4) + param(i, 3) > param(i, 2) then out[i] = math.max(1, ke - at) end
  else
    tats[i] = gcra_tat(KEYS[i], now)
    out[i] = gcra_wait(tats[i], now, param(i, 1), param(i, 2), param(i, 4), param(i, 3))
    if out[i] > 0 and param(i, 3) == 0 then
      -- Refused by the bucket: slots a batch gave back may fit.
      holes[i] = holes_find(KEYS[i], now, param(i, 1), param(i, 2), param(i, 4))
      if holes[i] then out[i] = 0 end
    end
  end
  if out[i] > 0 then refused = true end
end
if refused then
  -- Then what each calendar limit has left, in order.
  for i = 1, k do
    local c = cal[i]
    if c then table.insert(out, math.max(param(i, 2) - c[1], 0)) end
  end
  table.insert(out, 1, 0)
  return out
end
local held, full = {}, false
for j = 1, m do
  local key = KEYS[k + j]
  local max = tonumber(ARGV[5 + 4 * k + j])
  -- Leases of instances that stopped renewing them are gone.
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  held[j] = redis.call('ZCARD', key)
  if held[j] >= max then full = true end
end
if full then
  for i = 1, k do
    local c = cal[i]
    if c then
      out[i] = cal_answer(param(i, 2) - c[1], c[2], c[5])
    else
      out[i] = gcra_capacity(tats[i], now, param(i, 1), param(i, 2))
    end
  end
  for j = 1, m do out[k + j] = held[j] end
  table.insert(out, 1, 2)
  return out
end
for i = 1, k do
  local c = cal[i]
  if c then
    local n = c[1] + param(i, 4)
    cal_store(KEYS[i], c[2], c[3], n, c[4])
    out[i] = cal_answer(param(i, 2) - n, c[2], c[5])
  else
    out[i] = gcra_commit(KEYS[i], tats[i], now, param(i, 1), param(i, 2), param(i, 4), holes[i])
  end
end
for j = 1, m do
  local key = KEYS[k + j]
  redis.call('ZADD', key, string.format('%d', now + ttl), member)
  redis.call('PEXPIRE', key, string.format('%d', math.ceil(ttl / 1000)))
  out[k + j] = held[j] + 1
end
table.insert(out, 1, 1)
return out
