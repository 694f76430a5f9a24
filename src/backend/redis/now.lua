-- Prepended to every tierlimit script: the time in microseconds, from `arg`
-- when given (tests pass a fake clock's), else Redis's own TIME.
local function now_us(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local tm = redis.call('TIME')
  return tonumber(tm[1]) * 1000000 + tonumber(tm[2])
end
