# One image from POST /t2i: JSON in, the image out (cube.png, 256x256).
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' \
  -d '{"prompt": "a red cube", "width": 256, "height": 256, "seed": 1}' -o cube.png
