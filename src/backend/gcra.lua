-- tierlimit's GCRA, governor's arithmetic in microseconds.
-- KEYS[1]: the bucket. ARGV: interval (us), max, cost, now (us; empty: Redis TIME),
-- reserve (cells a non-critical request must leave), peek ('1': report, count nothing).
-- Returns {1, remaining} when allowed, {0, retry_after_us} when refused; a peek
-- answers as a check of one request would, counting nothing.
local t = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now = now_us(ARGV[4])
local reserve = tonumber(ARGV[5]) or 0
local tau = t * (max - 1)
local add = t * (n - 1)
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then tat = now end
if ARGV[6] == '1' then
  -- A peek: what a check of one request would answer, counting nothing.
  local rem = math.floor(math.min(math.max(now + tau + t - tat, 0), tau + t) / t)
  if rem > 0 then return {1, rem} end
  return {0, tat - tau - now}
end
local earliest = tat + add + reserve * t - tau
if now < earliest then
  return {0, earliest - now}
end
local nxt = math.max(tat, now) + t + add
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', string.format('%d', math.ceil((nxt - now) / 1000)))
local rem = math.floor(math.min(now + tau + t - nxt, tau + t) / t)
return {1, rem}
