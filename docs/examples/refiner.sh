# serve: --model tiny-sdxl --refiner tiny-sdxl-refiner
# The base runs the first 80% of the steps, the refiner the last 20% (refiner_switch).
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' -o refined.png -d '{
  "prompt": "a lighthouse on a cliff at dusk", "width": 128, "height": 128,
  "inference_steps": 10, "refiner_switch": 0.8, "seed": 1}'
# The same through the A1111 door: the served refiner by name, and where it takes over.
curl -sS --fail-with-body "$URL/sdapi/v1/txt2img" -H 'content-type: application/json' \
  -o refined.json -d '{"prompt": "a lighthouse on a cliff at dusk", "width": 128,
  "height": 128, "steps": 10, "refiner_checkpoint": "tiny-sdxl-refiner",
  "refiner_switch_at": 0.8, "seed": 1}'
