# Submit and hold the answer up to 30 s (Prefer: wait=N, N <= 60): 200 with the finished job
# if it ended in time, else 202 and the job to poll. Then fetch the image and delete it.
# Needs jq.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/v1/jobs" -H 'content-type: application/json' \
  -H 'Prefer: wait=30' -H 'Idempotency-Key: cube-1' \
  -d '{"prompt": "a red cube", "width": 256, "height": 256, "seed": 1}' -o job.json
jq '{id, status, result}' job.json
job=$(jq -r .id job.json)
curl -sS --fail-with-body "$URL/v1/jobs/$job/image" -o cube.png
curl -sS --fail-with-body -X DELETE "$URL/v1/jobs/$job"   # the image reads 410 from now on
