# serve: --model tiny-flux
# A FLUX.1 model (here the random-weight tiny-flux): guidance_scale is FLUX's own guidance
# input (3.5 is FLUX.1-dev's usual), the sampler its flow-matching Euler, sizes multiples of 16.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' -o flux.png -d '{
  "prompt": "a lighthouse on a cliff at dusk", "width": 256, "height": 256,
  "inference_steps": 4, "guidance_scale": 3.5, "sampler": "flow-euler", "seed": 1}'
# What the model takes: its family, pipeline, samplers and sizes.
curl -sS --fail-with-body "$URL/v1/info" -o flux-info.json
python3 -c 'import json; i = json.load(open("flux-info.json"))
print(i["engine"]["family"], i["engine"]["pipeline"], i["engine"]["batched"],
      i["samplers"]["served"], i["sizes"]["multiple_of"])'
