# serve: --lora-dir $EXAMPLE_DATA/loras
# Per-request LoRA with curl: list what --lora-dir holds, then one image with the LoRA "ink"
# at 0.8 (ink.png) and one without (plain.png). Requests with different LoRAs, or none, share
# one batch.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/v1/loras"
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' \
  -d '{"prompt": "a lighthouse at dusk", "seed": 3,
       "loras": [{"name": "ink", "scale": 0.8}]}' -o ink.png
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' \
  -d '{"prompt": "a lighthouse at dusk", "seed": 3}' -o plain.png
