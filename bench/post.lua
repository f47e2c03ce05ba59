-- wrk script for bench/run.py: POST one small chat completion request, then print a one-line
-- JSON summary (prefixed BENCH_JSON) that run.py parses instead of wrk's text report.
-- Environment: BENCH_KEY (client key; optional), BENCH_STREAM=1 (ask for a stream),
-- BENCH_CHUNKS (x-fake-chunks: content pieces the fake upstream streams).
-- By hand: BENCH_KEY=k wrk -t1 -c64 -d10s --latency -s bench/post.lua http://127.0.0.1:8080/v1/chat/completions

local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]'
if os.getenv("BENCH_STREAM") == "1" then
  body = body .. ',"stream":true'
end
wrk.method = "POST"
wrk.body = body .. "}"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
local chunks = os.getenv("BENCH_CHUNKS")
if chunks and chunks ~= "" then
  wrk.headers["x-fake-chunks"] = chunks
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
