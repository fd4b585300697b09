-- wrk script: POST an image as multipart/form-data and print a JSON summary line at the end.
--   wrk -t2 -c16 -d10s -s bench/predict.lua http://localhost:8000/predict -- samples/zero.png
--   wrk -t2 -c4 -d10s -s bench/predict.lua http://localhost:8000/predict/batch -- samples/zero.png 32
-- On /predict the image goes in the field "file"; on /predict/batch it is sent COUNT times as "files".
-- With PREDICT_TOKEN set in the environment, it is sent as a bearer token.
local boundary = "wrk-mnist-7b3c1d9e5f"

function init(args)
  local path = args[1] or "samples/zero.png"
  local count = tonumber(args[2] or "1")
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  local field = wrk.path:match("/batch$") and "files" or "file"
  local filename = path:match("([^/]+)$")
  local part = "--" .. boundary .. "\r\n"
    .. 'Content-Disposition: form-data; name="' .. field .. '"; filename="' .. filename .. '"\r\n'
    .. "Content-Type: application/octet-stream\r\n\r\n" .. data .. "\r\n"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  local token = os.getenv("PREDICT_TOKEN")
  if token and token ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. token
  end
  wrk.body = string.rep(part, count) .. "--" .. boundary .. "--\r\n"
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_s": %.3f, "rps": %.1f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, '
      .. '"max_ms": %.3f, "non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end
