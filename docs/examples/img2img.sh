# Img2img with curl: make a picture with /t2i (barn.png), then repaint it at strength 0.6
# (winter.png, the picture's own size). The image travels as base64 in the JSON body; a
# data:image/png;base64, prefix is fine too.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' \
  -d '{"prompt": "a red barn in a field", "width": 512, "height": 384, "seed": 1}' -o barn.png
{ printf '{"prompt": "the same barn in winter, snow", "strength": 0.6, "seed": 2, '
  printf '"init_image": "'; base64 < barn.png | tr -d '\n'; printf '"}'
} > body.json
curl -sS --fail-with-body "$URL/t2i" -H 'content-type: application/json' \
  --data-binary @body.json -o winter.png
