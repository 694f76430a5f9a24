-- Prepended to the scripts whose late run would count twice (a check or a
-- settlement that the caller gave up on and answered through the fallback,
-- run when a paused or stalled server resumes): ARGV[1] is a deadline in
-- microseconds on Redis's clock (empty: none), removed from ARGV before the
-- script reads its arguments. After the deadline the script does nothing.
local deadline = table.remove(ARGV, 1)
if deadline ~= '' then
  local tm = redis.call('TIME')
  if tonumber(tm[1]) * 1000000 + tonumber(tm[2]) > tonumber(deadline) then
    return redis.error_reply('TIERLIMIT_LATE past its deadline: nothing done')
  end
end
