# Submit and hold the answer up to 30 s (Prefer: wait=N, N <= 60): 200 with the finished job
# if it ended in time, else 202 with the job still queued or running, polled as in jobs.sh.
# Then fetch the image and delete it. Needs jq.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
curl -sS --fail-with-body "$URL/v1/jobs" -H 'content-type: application/json' \
  -H 'Prefer: wait=30' -H 'Idempotency-Key: cube-1' \
  -d '{"prompt": "a red cube", "width": 128, "height": 128, "seed": 1}' -o job.json
job=$(jq -r .id job.json)
while [ "$(jq -r .status job.json)" != succeeded ]; do
  case $(jq -r .status job.json) in failed|canceled) cat job.json >&2; exit 1 ;; esac
  sleep 1
  curl -sS --fail-with-body "$URL/v1/jobs/$job" -o job.json
done
jq '{id, status, result}' job.json
curl -sS --fail-with-body "$URL/v1/jobs/$job/image" -o cube.png
curl -sS --fail-with-body -X DELETE "$URL/v1/jobs/$job"   # the image reads 410 from now on
