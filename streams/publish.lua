-- KEYS: the Streams of every event's topics, in order. ARGV: trim operator, maxlen, ttl, the
-- terminal event types (space-separated), the announcing command (PUBLISH; SPUBLISH on a Redis
-- Cluster, where every key and channel of one call is in one slot), then for each event its
-- type, its JSON, its number of topics n, their n channels and n flags ('1': the topic ends at
-- a terminal event). The announcement is "<stream id>\n<type>\n<json>" so that the hub can
-- frame it without a read or a JSON parse. A script runs atomically: no reader sees an entry
-- before its TTL is set, and an announcement cannot be lost between XADD and PUBLISH. An event
-- for a topic that has ended (its newest entry is terminal) is dropped from all its topics, in
-- the same atomic step: a late `operation.started` (an instance woken from SIGSTOP after
-- another finished its work, an announcement retried through a Redis outage) can never follow
-- the end of its operation. A dropped event's ids are answered as {terminal id}, so that a
-- caller can tell (streams.cluster publishes a user's topic only after its operation's).
local op, maxlen, ttl, announce = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local terminal = {}
for t in string.gmatch(ARGV[4], '%S+') do terminal[t] = true end
local a, k, ids = 6, 1, {}
while a <= #ARGV do
  local etype, data, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local ended = false
  for i = 0, n - 1 do
    if ARGV[a + n + i] == '1' then
      local last = redis.call('XREVRANGE', KEYS[k + i], '+', '-', 'COUNT', 1)
      if last[1] and terminal[last[1][2][2]] then ended = last[1][1] end
    end
  end
  for i = 0, n - 1 do
    if ended then
      ids[k] = {ended}
    else
      local id = redis.call('XADD', KEYS[k], 'MAXLEN', op, maxlen, '*', 't', etype, 'd', data)
      redis.call('EXPIRE', KEYS[k], ttl)
      redis.call(announce, ARGV[a + i], id .. '\n' .. etype .. '\n' .. data)
      ids[k] = id
    end
    k = k + 1
  end
  a = a + 2 * n
end
return ids
