-- wrk script of bench/mix_bench.py: a mixed workload at an offered rate, the
-- same through the gateway and straight to the services.
--
-- Threads alternate between two roles, each with its own address: "catalog"
-- (list pages of 20, searches, product pages) and "auth" (/auth/users/me with
-- a bearer token, and one login in 200, each login as the next of the
-- accounts in LOGINS_FILE so no account's login throttle is the limit).
--
-- The rate is fixed, not whatever the server answers: each thread owns a
-- schedule of RATE / threads requests a second, and wrk's delay() hook holds
-- each connection until the next free slot of that schedule. A connection
-- that comes back after its slot has passed sends at once and the request is
-- counted as late by how far it is behind (from when it was due it has
-- already waited that long: wrk times a request only from when it is sent).
-- With enough connections no slot waits for one, and the achieved rate is
-- the offered one; when the server cannot keep up the slots fall behind,
-- the achieved rate drops and the late count grows.
--
-- Environment: CATALOG_ADDR, AUTH_ADDR (host:port), RATE (requests a second,
-- all threads), CONNECTIONS (wrk's -c), SLO_MS (a start this far behind its
-- slot is late), TOKEN, IDS_FILE (one product id a line), LOGINS_FILE (one
-- email a line), LOGIN_PASSWORD.
-- done() prints one line, "MIX {json}", with the figures of the run.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } mix_timespec;
int clock_gettime(int clock, mix_timespec *now);
]])
local CLOCK_MONOTONIC = 1
local clock = ffi.new("mix_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
  local index = #threads + 1
  local role = (index % 2 == 1) and "catalog" or "auth"
  local address = os.getenv(role == "catalog" and "CATALOG_ADDR" or "AUTH_ADDR")
  local host, port = address:match("([^:]+):(%d+)")
  thread.addr = wrk.lookup(host, port)[1]
  thread:set("role", role)
  threads[index] = thread
end

local function lines(path)
  local found = {}
  for line in io.lines(path) do
    if line ~= "" then
      found[#found + 1] = line
    end
  end
  return found
end

function init(args)
  ids = lines(os.getenv("IDS_FILE"))
  logins = lines(os.getenv("LOGINS_FILE"))
  words = {"red", "green", "blue", "apple", "pear", "bread", "lamp", "chair", "table", "soap"}
  bearer = {["Authorization"] = "Bearer " .. os.getenv("TOKEN")}
  form = {["Content-Type"] = "application/x-www-form-urlencoded"}
  password = os.getenv("LOGIN_PASSWORD")
  counter = 0
  logins_sent = 0
  statuses = {}
  -- this thread's share of the rate; wrk hands each thread CONNECTIONS / threads
  local share = tonumber(os.getenv("THREADS"))
  interval = 1000 / (tonumber(os.getenv("RATE")) / share)
  local connections = math.floor(tonumber(os.getenv("CONNECTIONS")) / share)
  late_ms = tonumber(os.getenv("SLO_MS"))
  -- every connection's first request goes out unpaced, when it connects
  next_slot = now_ms() + connections * interval
  late = 0
  lag_max = 0
end

function delay()
  local now = now_ms()
  local slot = next_slot
  next_slot = slot + interval
  local wait = slot - now
  if wait > 0 then
    return math.floor(wait)
  end
  if -wait > lag_max then
    lag_max = -wait
  end
  if -wait >= late_ms then
    late = late + 1
  end
  return 0
end

function request()
  counter = counter + 1
  if role == "catalog" then
    local k = counter % 10
    if k < 4 then
      return wrk.format("GET", "/catalog/products?limit=20")
    elseif k < 6 then
      return wrk.format("GET", "/catalog/products?limit=20&q=" .. words[counter % #words + 1])
    end
    return wrk.format("GET", "/catalog/products/" .. ids[counter % #ids + 1])
  end
  if counter % 200 == 0 then
    logins_sent = logins_sent + 1
    local email = logins[logins_sent % #logins + 1]
    return wrk.format("POST", "/auth/token", form, "username=" .. email .. "&password=" .. password)
  end
  return wrk.format("GET", "/auth/users/me", bearer)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local function json(value)
  if type(value) == "table" then
    local parts = {}
    for key, item in pairs(value) do
      parts[#parts + 1] = string.format("%q:%s", tostring(key), json(item))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return tostring(value)
end

function done(summary, latency, requests)
  local slo_us = tonumber(os.getenv("SLO_MS")) * 1000
  local slow = 0
  for i = 1, #latency do
    local value, count = latency(i)
    if value > slo_us then
      slow = slow + count
    end
  end
  local figures = {
    requests = summary.requests,
    seconds = summary.duration / 1e6,
    p50_ms = latency:percentile(50) / 1000,
    p90_ms = latency:percentile(90) / 1000,
    p99_ms = latency:percentile(99) / 1000,
    max_ms = latency.max / 1000,
    slow = slow,
    errors = summary.errors,
    late = 0,
    lag_max_ms = 0,
    logins = 0,
    statuses = {},
  }
  for _, thread in ipairs(threads) do
    figures.late = figures.late + thread:get("late")
    figures.lag_max_ms = math.max(figures.lag_max_ms, thread:get("lag_max"))
    figures.logins = figures.logins + thread:get("logins_sent")
    local role = thread:get("role")
    local counts = figures.statuses[role] or {}
    for status, count in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + count
    end
    figures.statuses[role] = counts
  end
  io.write("MIX " .. json(figures) .. "\n")
end
