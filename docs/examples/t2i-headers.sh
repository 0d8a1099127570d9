# The same request as JPEG, printing the answer's headers: X-Seed (the seed used),
# X-Batch-Size, X-Queue-Ms, X-Inference-Ms, X-Request-Id.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' \
  -d '{"prompt": "a red cube", "negative_prompt": "blurry", "width": 128, "height": 128,
       "inference_steps": 20, "guidance_scale": 7.5, "sampler": "euler-a", "format": "jpeg"}' \
  -D - -o cube.jpg
