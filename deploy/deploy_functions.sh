#!/usr/bin/env bash
# Deploy the preannotate Nuclio functions into CVAT's Nuclio project, as CVAT's serverless/deploy_cpu.sh and
# deploy_gpu.sh do; run it through deploy_cpu.sh or deploy_gpu.sh:
#
#   deploy/deploy_cpu.sh [FUNCTION...]     function.yaml of each function, base image cvat.preannotate.base:cpu
#   deploy/deploy_gpu.sh [FUNCTION...]     function-gpu.yaml, base image cvat.preannotate.base:gpu
# (functions under functions/tensorflow/ use cvat.preannotate.base-tf:cpu or :gpu, built when one is deployed)
#
# FUNCTION: an architecture (ssdlite320_mobilenet_v3_large), a function name (pth-preannotate-...) or a directory
# searched for function files; none deploys every function under functions/.
# Secrets never go into the YAML: CVAT_URL, CVAT_ORG, CVAT_USERNAME, CVAT_PASSWORD, CVAT_ACCESS_TOKEN,
# PREANNOTATE_WEBHOOK_SECRET and PREANNOTATE_API_TOKEN are passed with --env when set in this environment.
# DRY_RUN=1 prints the commands (secret values as "$NAME") instead of running them; BUILD_BASE=0 skips the base
# image build; NUCLIO_NETWORK (default cvat_cvat) is the Docker network of CVAT the functions join.
set -euo pipefail

variant=${1:?usage: deploy_functions.sh cpu|gpu [FUNCTION...]}
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUNCTIONS_DIR=${FUNCTIONS_DIR:-$REPO/functions}
NETWORK=${NUCLIO_NETWORK:-cvat_cvat}
SECRETS=(CVAT_URL CVAT_ORG CVAT_USERNAME CVAT_PASSWORD CVAT_ACCESS_TOKEN PREANNOTATE_WEBHOOK_SECRET
         PREANNOTATE_API_TOKEN)
case "$variant" in
    cpu) file=function.yaml; build_args=(--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu)
         tf_args=(--build-arg EXTRAS=tf) ;;
    gpu) file=function-gpu.yaml; build_args=(); tf_args=(--build-arg EXTRAS=tf-gpu) ;;
    *) echo "deploy_functions.sh: the variant is cpu or gpu, not '$variant'" >&2; exit 2 ;;
esac

# One shell word, quoted only when it needs to be.
quote() {
    case "$1" in
        "" | *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
        *) printf '%s' "$1" ;;
    esac
}

# Run a command, or with DRY_RUN=1 print it on one line (a secret's value shown as a reference to its variable).
run() {
    if [ "${DRY_RUN:-0}" != 1 ]; then
        "$@"
        return
    fi
    local line="" word
    for word in "$@"; do
        case "$word" in
            CVAT_PASSWORD=* | CVAT_ACCESS_TOKEN=* | PREANNOTATE_WEBHOOK_SECRET=* | PREANNOTATE_API_TOKEN=*)
                line+="\"${word%%=*}=\$${word%%=*}\" " ;;
            *) line+="$(quote "$word") " ;;
        esac
    done
    echo "${line% }"
}

# The function files to deploy, from the arguments.
configs=()
[ $# -gt 0 ] || set -- "$FUNCTIONS_DIR"
for want in "$@"; do
    if [ -d "$want" ]; then
        mapfile -t found < <(find "$want" -name "$file" | sort)
    else
        arch=${want#pth-preannotate-}
        arch=${arch#tf-preannotate-}
        arch=${arch//-/_}
        mapfile -t found < <(find "$FUNCTIONS_DIR" -path "*/$arch/nuclio/$file" | sort)
    fi
    if [ ${#found[@]} -eq 0 ]; then
        echo "deploy_functions.sh: no $file for '$want' under $FUNCTIONS_DIR" >&2
        exit 1
    fi
    configs+=("${found[@]}")
done

env_args=()
for name in "${SECRETS[@]}"; do
    if [ -n "${!name:-}" ]; then
        env_args+=(--env "$name=${!name}")
    fi
done

if [ "${DRY_RUN:-0}" != 1 ]; then
    for tool in docker nuctl; do
        command -v "$tool" >/dev/null || { echo "deploy_functions.sh: $tool is not on PATH" >&2; exit 1; }
    done
fi

export DOCKER_BUILDKIT=1
if [ "${BUILD_BASE:-1}" != 0 ]; then
    # one base image per framework among the functions deployed: a TensorFlow function never carries torch
    need_torch=0 need_tf=0
    for config in "${configs[@]}"; do
        case "$config" in */tensorflow/*) need_tf=1 ;; *) need_torch=1 ;; esac
    done
    if [ "$need_torch" = 1 ]; then
        run docker build -f "$REPO/deploy/Dockerfile.base" ${build_args[@]+"${build_args[@]}"} \
            -t "cvat.preannotate.base:$variant" "$REPO"
    fi
    if [ "$need_tf" = 1 ]; then
        run docker build -f "$REPO/deploy/Dockerfile.base" "${tf_args[@]}" -t "cvat.preannotate.base-tf:$variant" "$REPO"
    fi
fi

# Create the project only when missing, so that a second run never trips over creating it.
if [ "${DRY_RUN:-0}" = 1 ] || ! nuctl get project cvat --platform local >/dev/null 2>&1; then
    run nuctl create project cvat --platform local
fi

for config in "${configs[@]}"; do
    func_root="$(dirname "$config")"
    echo "Deploying $(basename "$(dirname "$func_root")") ($variant)..." >&2
    run nuctl deploy --project-name cvat --path "$func_root" \
        --file "$config" --platform local \
        ${env_args[@]+"${env_args[@]}"} \
        --platform-config "{\"attributes\": {\"network\": \"$NETWORK\"}}"
done

run nuctl get function --platform local
