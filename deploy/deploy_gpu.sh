#!/usr/bin/env bash
# Deploy the preannotate functions on a GPU (function-gpu.yaml), as CVAT's serverless/deploy_gpu.sh does.
# Usage: deploy/deploy_gpu.sh [FUNCTION...]; DRY_RUN=1 prints the commands. See deploy_functions.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/deploy_functions.sh" gpu "$@"
