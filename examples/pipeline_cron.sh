#!/usr/bin/env bash
# The pipeline chain once, as cron runs it (docs/pipelines.md): retrain -> evaluate -> promote ->
# refresh -> gc over one feature repo. A crontab line running it hourly:
#   0 * * * *  /srv/rcllm/examples/pipeline_cron.sh /srv/rcllm/feature_repo fs:///var/cache/rcllm-kv
# Exit status: 0 when the chain finished (also when there was no new data), 2 when a step failed
# (serving stays on the champion; the next run resumes) or another run holds the repo's lock.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="${1:-feature_repo}"
STORE="${2:-fs://$(pwd)/${REPO}/data/kv}"
exec .venv/bin/rcllm pipeline run --repo "$REPO" --store "$STORE" ${RCLLM_PIPELINE_ARGS:-}
