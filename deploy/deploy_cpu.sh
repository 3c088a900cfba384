#!/usr/bin/env bash
# Deploy the preannotate functions on CPU (function.yaml), as CVAT's serverless/deploy_cpu.sh does.
# Usage: deploy/deploy_cpu.sh [FUNCTION...]; DRY_RUN=1 prints the commands. See deploy_functions.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/deploy_functions.sh" cpu "$@"
