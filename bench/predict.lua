-- wrk script: POST one image (the file named by $IMAGE) to /api/predict, and count the
-- answers by status (printed at the end as "statuses: 200 N, 503 N, other N").
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"
local f = assert(io.open(os.getenv("IMAGE"), "rb"))
wrk.body = f:read("*all")
f:close()

local threads = {}

function setup(thread)
    table.insert(threads, thread)
end

function init(args)
    ok, busy, other = 0, 0, 0
end

function response(status, headers, body)
    if status == 200 then
        ok = ok + 1
    elseif status == 503 then
        busy = busy + 1
    else
        other = other + 1
    end
end

function done(summary, latency, requests)
    local o, b, x = 0, 0, 0
    for _, t in ipairs(threads) do
        o = o + t:get("ok")
        b = b + t:get("busy")
        x = x + t:get("other")
    end
    io.write(string.format("statuses: 200 %d, 503 %d, other %d\n", o, b, x))
end
