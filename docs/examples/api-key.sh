# serve: --api-key $BATCHSERVE_API_KEY
# A server started with BATCHSERVE_API_KEY (or --api-key) wants the key on every request.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/t2i" -H "Authorization: Bearer $BATCHSERVE_API_KEY" \
  -H 'content-type: application/json' \
  -d '{"prompt": "a red cube", "width": 128, "height": 128}' -o cube.png
