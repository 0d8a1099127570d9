# An async job: submit (202 and the job's id at once), poll until it ends, fetch the image.
# Needs jq.
URL=${BATCHSERVE_URL:-http://127.0.0.1:8000}
job=$(curl -sS --fail-with-body "$URL/v1/jobs" -H 'content-type: application/json' \
  -d '{"prompt": "a red cube", "width": 128, "height": 128, "seed": 1}' | jq -r .id)
while :; do
  status=$(curl -sS --fail-with-body "$URL/v1/jobs/$job" | jq -r .status)
  case $status in   # queued | running | succeeded | failed | canceled
    succeeded) break ;;
    failed|canceled) curl -sS "$URL/v1/jobs/$job" >&2; exit 1 ;;
  esac
  sleep 1
done
curl -sS --fail-with-body "$URL/v1/jobs/$job/image" -o cube.png
