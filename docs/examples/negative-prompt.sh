# A community-checkpoint style prompt: a long prompt, and a textual-inversion token
# (EasyNegative, loaded by --embeddings) in the negative prompt. SD 1.x checkpoints are trained
# at 512x512: drop width and height to get that default.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' -o bag.png -d '{
  "prompt": "product photo of a leather bag on a marble table, soft light, 85mm",
  "negative_prompt": "EasyNegative, blurry", "width": 128, "height": 128, "seed": 1}'
