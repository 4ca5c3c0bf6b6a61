-- wrk script of scripts/bench-real.sh: a mixed, authenticated KoproGo workload against
-- the real koprogo-api. Every wrk thread (its connections in turn) runs a cycle of 20 requests:
-- 16 GETs of the paginated list endpoints (80 %) and 4 POSTs (20 %) creating an
-- expense, an owner, a meeting (as the syndic of the demo's first organisation) and a
-- unit (as the superadmin: only it may create units). Bodies carry ids read from the
-- seeded data and names unique per run, thread and request (owner e-mails are unique
-- per organisation and unit numbers per building, so a repeated body would be a 4xx).
-- GET /units is left out: koprogo-api at commit 1a5da567 panics on every unit read
-- (unit_repository_impl.rs: column "quota" FLOAT8 decoded as Decimal).
--
-- Input (environment): BENCH_SYNDIC_TOKEN, BENCH_ADMIN_TOKEN, BENCH_ORG (organisation
-- id), BENCH_BUILDINGS (building ids of that organisation, comma-separated),
-- BENCH_TAG (unique per run).
-- Output: the last line on stdout is one JSON object (requests, duration, latency
-- percentiles in microseconds, socket errors, non-2xx count and status histogram).

local threads = {}
local next_id = 1

function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local function need(name)
  local v = os.getenv(name)
  if v == nil or v == "" then
    error("bench-real.lua: environment variable " .. name .. " is not set")
  end
  return v
end

local gets, cycle, buildings, org, tag, syndic, admin, json_h

function init(args)
  syndic = "Bearer " .. need("BENCH_SYNDIC_TOKEN")
  admin = "Bearer " .. need("BENCH_ADMIN_TOKEN")
  org = need("BENCH_ORG")
  tag = need("BENCH_TAG") .. "t" .. thread_id
  buildings = {}
  for b in string.gmatch(need("BENCH_BUILDINGS"), "[^,]+") do table.insert(buildings, b) end
  local h = { ["Authorization"] = syndic }
  gets = {
    buildings = wrk.format("GET", "/api/v1/buildings", h),
    owners = wrk.format("GET", "/api/v1/owners", h),
    expenses = wrk.format("GET", "/api/v1/expenses", h),
    meetings = wrk.format("GET", "/api/v1/meetings", h),
  }
  -- 20 slots: each list 4 times, each POST once, the POSTs spread over the cycle.
  cycle = {
    "buildings", "owners", "expenses", "meetings", "post_expense",
    "buildings", "owners", "expenses", "meetings", "post_owner",
    "buildings", "owners", "expenses", "meetings", "post_meeting",
    "buildings", "owners", "expenses", "meetings", "post_unit",
  }
  n = 0
  non2xx = 0
  statuses = {}
  posts = 0
end

local categories = { "Maintenance", "Repairs", "Insurance", "Utilities", "Cleaning", "Administration", "Works", "Other" }

local function post(path, auth, body)
  posts = posts + 1
  return wrk.format("POST", path, { ["Authorization"] = auth, ["Content-Type"] = "application/json" }, body)
end

function request()
  n = n + 1
  local kind = cycle[(n - 1) % #cycle + 1]
  local req = gets[kind]
  if req then return req end
  local b = buildings[n % #buildings + 1]
  local id = tag .. "n" .. n
  if kind == "post_expense" then
    return post("/api/v1/expenses", syndic, string.format(
      '{"building_id":"%s","category":"%s","description":"Facture %s","amount":%d.%02d,' ..
      '"expense_date":"2026-11-%02dT10:00:00Z","supplier":"Fournisseur SA","invoice_number":"F-%s"}',
      b, categories[n % #categories + 1], id, 50 + n % 900, n % 100, 1 + n % 28, id))
  elseif kind == "post_owner" then
    return post("/api/v1/owners", syndic, string.format(
      '{"first_name":"Marie","last_name":"Dupont %s","email":"%s@bench.example.be",' ..
      '"phone":"+32470%06d","address":"Rue de la Loi %d","city":"Bruxelles","postal_code":"1000","country":"Belgique"}',
      id, id, n % 1000000, 1 + n % 200))
  elseif kind == "post_meeting" then
    return post("/api/v1/meetings", syndic, string.format(
      '{"building_id":"%s","meeting_type":"%s","title":"AG %s","description":"Budget et travaux",' ..
      '"scheduled_date":"2027-%02d-%02dT18:30:00Z","location":"Salle du conseil"}',
      b, (n % 2 == 0) and "Ordinary" or "Extraordinary", id, 1 + n % 12, 1 + n % 28))
  else -- post_unit
    return post("/api/v1/units", admin, string.format(
      '{"organization_id":"%s","building_id":"%s","unit_number":"%s","unit_type":"Parking",' ..
      '"floor":-1,"surface_area":12.5,"quota":1}',
      org, b, id))
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    local k = tostring(status)
    statuses[k] = (statuses[k] or 0) + 1
  end
end

function done(summary, latency, requests)
  local bad, posted, hist = 0, 0, {}
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx")
    posted = posted + t:get("posts")
    local s = t:get("statuses")
    if type(s) == "table" then
      for k, v in pairs(s) do hist[k] = (hist[k] or 0) + v end
    end
  end
  local parts = {}
  for k, v in pairs(hist) do table.insert(parts, string.format('"%s":%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"posts_sent":%d,"non2xx":%d,"statuses":{%s},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, posted, bad, table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
