-- wrk script of bench/mix_bench.py: a mixed workload, the same through the
-- gateway and straight to the services. Threads alternate between two roles,
-- each with its own address: "catalog" (list pages, searches, product pages)
-- and "auth" (/auth/users/me with a bearer token, and one login in 200).
-- Environment: CATALOG_ADDR, AUTH_ADDR (host:port), TOKEN, IDS_FILE (one
-- product id a line), LOGIN_EMAIL, LOGIN_PASSWORD.

local made = 0

function setup(thread)
  made = made + 1
  local role = (made % 2 == 1) and "catalog" or "auth"
  local address = os.getenv(role == "catalog" and "CATALOG_ADDR" or "AUTH_ADDR")
  local host, port = address:match("([^:]+):(%d+)")
  thread.addr = wrk.lookup(host, port)[1]
  thread:set("role", role)
end

function init(args)
  ids = {}
  for line in io.lines(os.getenv("IDS_FILE")) do
    ids[#ids + 1] = line
  end
  words = {"red", "green", "blue", "apple", "pear", "bread", "lamp", "chair", "table", "soap"}
  bearer = {["Authorization"] = "Bearer " .. os.getenv("TOKEN")}
  form = {["Content-Type"] = "application/x-www-form-urlencoded"}
  login = "username=" .. os.getenv("LOGIN_EMAIL") .. "&password=" .. os.getenv("LOGIN_PASSWORD")
  counter = 0
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
    return wrk.format("POST", "/auth/token", form, login)
  end
  return wrk.format("GET", "/auth/users/me", bearer)
end
