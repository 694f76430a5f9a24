-- tierlimit's batches: several units of every limit of a check taken in one
-- call, spent by one instance without a round trip, and what it did not
-- spend given back. Every key shares one hash tag (the owner): one call on
-- Redis Cluster too. The arithmetic is the batching core's (see
-- src/backend/batch/mod.rs): a batch's slots start after now + hold, so a
-- unit spent before then is never counted before it was spent.
-- ARGV[1]: 'take' or 'back'; ARGV[2]: now (us; empty: Redis TIME).
-- KEYS[1..k]: the rate buckets; KEYS[k + 1]: the mark (the tag of the last
--   batch taken of these buckets).
-- take: ARGV[3]: units wanted; ARGV[4]: the hold (us); ARGV[5]: the
--   batch's tag; then per bucket: interval (us), max, cost.
--   Returns {3, now, units, start_1, before_1, remaining_1, ...} with a
--   batch of `units` (at least the cost: the request's own units counted
--   from now, as a check counts them, the others after now + hold; start
--   is where the first would start were they together, and every TAT
--   moves to start + units * interval, all or nothing), marked with its
--   tag; else the request is checked as check.lua
--   checks a request without reserve or leases, in the same call: {1,
--   remaining_1, ...} allowed and counted, {0, retry_1, ...} refused.
-- back: ARGV[3]: the batch's tag; per bucket, from ARGV[4]: the batch's
--   end and where its used units end (us). Nothing changes unless the mark
--   is the batch's (buckets lost and made again, by FLUSHALL or a restart,
--   may hold another batch ending at the same TAT). A bucket whose TAT is
--   still the batch's end goes back to where the used units end; any
--   other is left alone, so a late give-back changes nothing. The mark
--   goes: a give-back acts once. Returns the number of buckets moved.
local now = now_us(ARGV[2])
local k = #KEYS - 1
local mark = KEYS[k + 1]
if ARGV[1] == 'back' then
  if redis.call('GET', mark) ~= ARGV[3] then
    return 0
  end
  redis.call('DEL', mark)
  local moved = 0
  for i = 1, k do
    local fin = tonumber(ARGV[2 + 2 * i])
    local used_end = tonumber(ARGV[3 + 2 * i])
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat and tat == fin then
      if used_end <= now then
        redis.call('DEL', KEYS[i])
      else
        gcra_store(KEYS[i], used_end, now)
      end
      moved = moved + 1
    end
  end
  return moved
end
local want = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])
local function param(i, j) return tonumber(ARGV[5 + 3 * (i - 1) + j]) end
local tats, starts = {}, {}
local units = want
for i = 1, k do
  local t, max = param(i, 1), param(i, 2)
  tats[i] = gcra_tat(KEYS[i], now)
  -- The request's own units now, the others after the hold; starts[i]
  -- is where the first would start were they together.
  local cost = param(i, 3)
  starts[i] = math.max(math.max(tats[i], now) + cost * t, now + hold) - cost * t
  units = math.min(units, math.floor(math.max(now + t * max - starts[i], 0) / t))
end
local cost = param(1, 3)
local out = {}
if units >= cost then
  out = {3, now, units}
  local last = now
  for i = 1, k do
    local t, max = param(i, 1), param(i, 2)
    local nxt = starts[i] + units * t
    gcra_store(KEYS[i], nxt, now)
    last = math.max(last, nxt)
    table.insert(out, starts[i])
    table.insert(out, tats[i])
    table.insert(out, gcra_capacity(nxt, now, t, max))
  end
  -- The mark lives as long as the longest bucket.
  redis.call('SET', mark, ARGV[5], 'PX', string.format('%d', math.ceil((last - now) / 1000)))
  return out
end
local refused = false
for i = 1, k do
  out[i] = gcra_wait(tats[i], now, param(i, 1), param(i, 2), param(i, 3), 0)
  if out[i] > 0 then refused = true end
end
if refused then
  table.insert(out, 1, 0)
  return out
end
for i = 1, k do
  local nxt = gcra_take(tats[i], now, param(i, 1), param(i, 3))
  gcra_store(KEYS[i], nxt, now)
  out[i] = gcra_capacity(nxt, now, param(i, 1), param(i, 2))
end
table.insert(out, 1, 1)
return out
