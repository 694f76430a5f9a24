-- tierlimit's GCRA over several limits at once, all or nothing: governor's
-- arithmetic in microseconds. Every key shares one hash tag (the owner), so
-- on Redis Cluster they live in one slot and this is one atomic call.
-- KEYS[i]: the buckets. ARGV[1]: now (us; empty: Redis TIME), then per key:
-- interval (us), max, reserve, cost.
-- Returns {1, remaining_1, ..., remaining_k} when every limit admits the
-- request (and counts it in all), else {0, retry_1, ..., retry_k} (us; 0 for
-- a limit that admits it) and counts nothing.
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local tm = redis.call('TIME')
  now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
end
local k = #KEYS
local tats, out = {}, {}
local refused = false
for i = 1, k do
  local t = tonumber(ARGV[4 * i - 2])
  local max = tonumber(ARGV[4 * i - 1])
  local reserve = tonumber(ARGV[4 * i])
  local n = tonumber(ARGV[4 * i + 1])
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
for i = 1, k do
  local t = tonumber(ARGV[4 * i - 2])
  local max = tonumber(ARGV[4 * i - 1])
  local n = tonumber(ARGV[4 * i + 1])
  local tau = t * (max - 1)
  local add = t * (n - 1)
  local nxt = math.max(tats[i], now) + t + add
  redis.call('SET', KEYS[i], string.format('%d', nxt), 'PX', string.format('%d', math.ceil((nxt - now) / 1000)))
  out[i] = math.floor(math.min(now + tau + t - nxt, tau + t) / t)
end
table.insert(out, 1, 1)
return out
