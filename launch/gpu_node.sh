#!/usr/bin/env bash
# Train openchat-jax on one machine with several GPUs (one process sees all of them).
set -euo pipefail

OC_SCRIPT=gpu_node.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_node.sh COMMAND [OPTIONS] [-- EXTRA...]

Run openchat-jax on this machine's GPUs: one process drives every visible GPU, so no
jax.distributed setup is needed. Run it on the GPU node itself (inside tmux/screen, or with
`srun --nodes=1 --gpus-per-node=8 launch/gpu_node.sh train ...` on a SLURM cluster).

Commands:
  install      create the venv, install jax for CUDA and this package
  prepare      `openchat-jax prepare` into --dataset-dir
  import-base  `openchat-jax convert hf-to-jax --add-eot`: --hf-dir into --init-from
  train        `openchat-jax train` on all GPUs (resumes from the newest checkpoint in --workdir)
  resume       the same command as train: training resumes by itself; with --max-attempts N,
               rerun after a crash until WORKDIR/final exists
  export       `openchat-jax convert jax-to-hf`: WORKDIR/final (or --ckpt) into --hf-out

Options (environment default in brackets):
  --venv DIR             virtual environment [OPENCHAT_VENV; REPO/.venv]
  --python PY            install: interpreter for the venv, Python >= 3.11 [OPENCHAT_PYTHON; python3]
  --jax-spec SPEC        install: pip requirement for JAX [OPENCHAT_JAX_SPEC; 'jax[cuda12]>=0.7,<0.11']
  --package SPEC         install: what to pip install [OPENCHAT_PACKAGE; this checkout, editable]
  --config FILE          config file [OPENCHAT_CONFIG]
  --workdir DIR          run directory: checkpoints, logs, final weights; a path or gs:// [OPENCHAT_WORKDIR]
  --dataset-dir DIR      prepared dataset, a path or gs:// [OPENCHAT_DATASET_DIR]
  --init-from DIR        converted base weights (train: --config.init_from; import-base: output) [OPENCHAT_INIT_FROM]
  --gpus LIST            CUDA_VISIBLE_DEVICES for the trainer, e.g. 0,1,2,3 [OPENCHAT_GPUS; all]
  --mem-fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION [OPENCHAT_MEM_FRACTION; 0.9]
  --env KEY=VALUE        more environment for the trainer (repeatable), e.g. XLA_FLAGS=...
  --max-attempts N       train/resume: runs before giving up [1]
  --retry-delay S        train/resume: seconds between runs [30]
  --hf-dir DIR           import-base: Hugging Face Llama-2 folder [OPENCHAT_HF_DIR]
  --hf-out DIR           export: output folder [OPENCHAT_HF_OUT]
  --ckpt DIR             export: checkpoint to convert [WORKDIR/final]
  --dry-run              print every command (one per line, exactly as it would run) and run none
  -h, --help             this help

Arguments after `--` go to `openchat-jax train` (train, resume) or `openchat-jax prepare`.

Example (paper's 13B on 8xH100):
  launch/gpu_node.sh install
  launch/gpu_node.sh train --config configs/llama2_13b_openchat.py --workdir /data/runs/13b \
      --dataset-dir /data/openchat --init-from /data/llama2-13b-jax --max-attempts 3
EOF
}

VENV=${OPENCHAT_VENV:-$OC_REPO_ROOT/.venv}
PYTHON=${OPENCHAT_PYTHON:-python3}
JAX_SPEC=${OPENCHAT_JAX_SPEC:-'jax[cuda12]>=0.7,<0.11'}
PACKAGE=${OPENCHAT_PACKAGE:-}
CONFIG=${OPENCHAT_CONFIG:-}
WORKDIR=${OPENCHAT_WORKDIR:-}
DATASET=${OPENCHAT_DATASET_DIR:-}
INIT_FROM=${OPENCHAT_INIT_FROM:-}
GPUS=${OPENCHAT_GPUS:-}
MEM_FRACTION=${OPENCHAT_MEM_FRACTION:-0.9}
ENV_ITEMS=()
MAX_ATTEMPTS=1
RETRY_DELAY=30
HF_DIR=${OPENCHAT_HF_DIR:-}
HF_OUT=${OPENCHAT_HF_OUT:-}
CKPT=''
EXTRA=()

# Called by oc_parse_options for each option that takes a value.
set_option() {
  case $1 in
    --venv) VENV=$2 ;;
    --python) PYTHON=$2 ;;
    --jax-spec) JAX_SPEC=$2 ;;
    --package) PACKAGE=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --dataset-dir) DATASET=$2 ;;
    --init-from) INIT_FROM=$2 ;;
    --gpus) GPUS=$2 ;;
    --mem-fraction) MEM_FRACTION=$2 ;;
    --env) ENV_ITEMS+=("$2") ;;
    --max-attempts) MAX_ATTEMPTS=$2 ;;
    --retry-delay) RETRY_DELAY=$2 ;;
    --hf-dir) HF_DIR=$2 ;;
    --hf-out) HF_OUT=$2 ;;
    --ckpt) CKPT=$2 ;;
  esac
}

oc_command 'install prepare import-base train resume export' "$@"
shift
oc_parse_options '' '--venv --python --jax-spec --package --config --workdir --dataset-dir --init-from
  --gpus --mem-fraction --env --max-attempts --retry-delay --hf-dir --hf-out --ckpt' "$@"

oc_require_int "$MAX_ATTEMPTS" --max-attempts
oc_require_int "$RETRY_DELAY" --retry-delay
((MAX_ATTEMPTS >= 1)) || oc_die "--max-attempts must be at least 1"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || oc_die "--mem-fraction must be a number in (0, 1], got '$MEM_FRACTION'"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || oc_die "--gpus must be a comma-separated list of GPU indices, got '$GPUS'"
oc_check_env_items "${ENV_ITEMS[@]+"${ENV_ITEMS[@]}"}"
BIN="$VENV/bin/openchat-jax"

do_install() {
  oc_run "$PYTHON" -m venv "$VENV"
  oc_run "$VENV/bin/pip" install --upgrade pip
  oc_run "$VENV/bin/pip" install "$JAX_SPEC"
  if [[ -n $PACKAGE ]]; then
    oc_run "$VENV/bin/pip" install "$PACKAGE"
  else
    oc_run "$VENV/bin/pip" install -e "$OC_REPO_ROOT"
  fi
}

train_cmd() {
  oc_require_run_paths "$CONFIG" "$WORKDIR" "$DATASET"
  oc_train_args "$CONFIG" "$WORKDIR" "$DATASET" "$INIT_FROM" "${EXTRA[@]+"${EXTRA[@]}"}"
  TRAIN_CMD=(env "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
  if [[ -n $GPUS ]]; then
    TRAIN_CMD+=("CUDA_VISIBLE_DEVICES=$GPUS")
  fi
  TRAIN_CMD+=("${ENV_ITEMS[@]+"${ENV_ITEMS[@]}"}" "$BIN" "${OC_TRAIN_ARGS[@]}")
}

do_train() {
  train_cmd
  local attempt=1 rc
  while true; do
    rc=0
    oc_run "${TRAIN_CMD[@]}" || rc=$?
    if [[ $OC_DRY_RUN == 1 ]]; then
      return 0
    fi
    # A local WORKDIR/final proves the run finished; for gs:// trust the exit status.
    if ((rc == 0)) && { oc_is_gcs "$WORKDIR" || [[ -e $WORKDIR/final ]]; }; then
      return 0
    fi
    if ((attempt >= MAX_ATTEMPTS)); then
      oc_die "training did not finish (exit $rc, attempt $attempt of $MAX_ATTEMPTS); run resume to continue"
    fi
    oc_log "training stopped (exit $rc); rerunning in ${RETRY_DELAY}s (it resumes from the newest checkpoint)"
    sleep "$RETRY_DELAY"
    attempt=$((attempt + 1))
  done
}

case $COMMAND in
  install) do_install ;;
  prepare)
    oc_require "$CONFIG" --config OPENCHAT_CONFIG
    oc_require "$DATASET" --dataset-dir OPENCHAT_DATASET_DIR
    oc_run "$BIN" prepare --config "$CONFIG" "--config.data.dataset_dir=$DATASET" "${EXTRA[@]+"${EXTRA[@]}"}"
    ;;
  import-base)
    oc_require "$HF_DIR" --hf-dir OPENCHAT_HF_DIR
    oc_require "$INIT_FROM" --init-from OPENCHAT_INIT_FROM
    oc_run "$BIN" convert hf-to-jax --hf-dir "$HF_DIR" --out "$INIT_FROM" --add-eot
    ;;
  train | resume) do_train ;;
  export)
    oc_require "$HF_OUT" --hf-out OPENCHAT_HF_OUT
    oc_export_ckpt "$CKPT" "$WORKDIR"
    oc_run "$BIN" convert jax-to-hf --ckpt "$OC_CKPT" --out "$HF_OUT"
    ;;
esac
