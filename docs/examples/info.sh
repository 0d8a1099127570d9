# What the server runs and how it is doing: GET /v1/info (model, device, batching, limits, live
# state) and two series of GET /metrics. Needs jq.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/v1/info" \
  | jq '{state, model: .engine.model, device: .engine.device, policy: .batching.flush_policy, live}'
curl -sS --fail-with-body "$URL/metrics" | grep -E '^batchserve_(images_total|queue_depth) '
