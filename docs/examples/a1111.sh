# The AUTOMATIC1111 API with curl: two images (batch_size 2, seeds 1 and 2), base64 in JSON.
# Needs jq and base64.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/sdapi/v1/txt2img" -H 'content-type: application/json' \
  -d '{"prompt": "a red cube", "steps": 20, "cfg_scale": 7, "width": 128, "height": 128,
       "seed": 1, "batch_size": 2, "sampler_name": "Euler a"}' -o answer.json
jq -r '.info | fromjson | .all_seeds' answer.json
jq -r '.images[0]' answer.json | base64 -d > cube-0.png
jq -r '.images[1]' answer.json | base64 -d > cube-1.png
