#!/usr/bin/env bash
# Train openchat-jax on a Cloud TPU VM pod slice with gcloud. See usage() or --help.
set -euo pipefail

OC_SCRIPT=tpu_pod.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [OPTIONS] [-- EXTRA...]

Run openchat-jax on a Cloud TPU VM pod slice (every worker runs the same command).

Commands:
  create       create the TPU VM (tpu-vm create, or a queued resource with --queued;
               waits until the queued resource is ACTIVE)
  install      install jax[tpu] and this package on every worker (--worker=all)
  prepare      run `openchat-jax prepare` on worker 0 and upload the dataset to --dataset-dir
  import-base  convert HF base weights (--hf-dir) on worker 0 into --init-from (hf-to-jax --add-eot)
  train        run `openchat-jax train` on all workers at once
  resume       bring the slice back if it was preempted (recreate + reinstall when needed),
               stop leftover trainers, rerun the same train command (it resumes from the newest
               checkpoint under --workdir); with --max-attempts N, repeat until WORKDIR/final exists
  stop         SIGTERM the trainers on every worker (they checkpoint and exit), SIGKILL after --stop-timeout
  export       convert WORKDIR/final (or --ckpt) to a Hugging Face folder at --hf-out, on worker 0
  status       describe the TPU VM / queued resource
  ssh          run `-- CMD...` on --worker (default all)
  delete       delete the TPU VM / queued resource (with its node)

Options (environment default in brackets):
  --project P            GCP project [OPENCHAT_PROJECT; else gcloud's configured project]
  --zone Z               zone, e.g. us-central2-b (v4), us-east5-a (v5p)   [OPENCHAT_ZONE] (required)
  --name N               TPU VM name, also the queued-resource id          [OPENCHAT_TPU_NAME] (required)
  --accelerator-type T   v4-64, v5p-64, v5litepod-64, v6e-64, ...          [OPENCHAT_ACCELERATOR_TYPE]
                         (required for create and resume)
  --runtime-version V    TPU software version [OPENCHAT_RUNTIME_VERSION; else from the type:
                         v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
                         v6e v2-alpha-tpuv6e]
  --queued               use a queued resource (queued-resources create/describe/delete) [OPENCHAT_QUEUED=1]
  --spot                 Spot capacity (preemptible; resume brings the run back)
  --preemptible          legacy preemptible TPU VM (plain tpu-vm create only)
  --reserved             use reserved capacity           [OPENCHAT_PROVISIONING=standard|spot|preemptible|reserved]
  --valid-until D        queued resource: give up waiting for capacity after D (e.g. 6h)
  --wait-timeout S       stop polling for ACTIVE/READY after S seconds, 0 = never [0]
  --poll-interval S      seconds between state polls [30]
  --create-arg ARG       extra argument for the create command (repeatable), e.g. --create-arg=--network=NET
  --ssh-arg ARG          extra argument for gcloud ssh/scp (repeatable), e.g. --ssh-arg=--tunnel-through-iap

 install:
  --git-url URL          workers clone URL at --ref   [OPENCHAT_GIT_URL; else this checkout is shipped:
                         `git archive REF` copied with gcloud scp (uncommitted changes are not shipped)]
  --ref REF              git commit/branch/tag [OPENCHAT_GIT_REF; HEAD for this checkout, main for --git-url]
  --jax-spec SPEC        pip requirement for JAX on TPU [OPENCHAT_JAX_SPEC; 'jax[tpu]>=0.7,<0.11']
  --python-version V     Python for the worker venv, fetched by uv when missing [OPENCHAT_PYTHON_VERSION; 3.11]
  --remote-dir DIR       source tree on each worker, relative to its home [OPENCHAT_REMOTE_DIR; openchat-jax]
  --venv DIR             venv on each worker, relative to its home [OPENCHAT_VENV; openchat-venv]

 train / resume / prepare / export / import-base:
  --config FILE          config path relative to the repository root [OPENCHAT_CONFIG]
  --workdir URI          run directory (checkpoints, logs, final weights), gs://...  [OPENCHAT_WORKDIR]
  --dataset-dir URI      prepared dataset, gs://...                                   [OPENCHAT_DATASET_DIR]
  --init-from URI        converted base weights (train: --config.init_from; import-base: output) [OPENCHAT_INIT_FROM]
  --env KEY=VALUE        environment for the trainer on every worker (repeatable), e.g. LIBTPU_INIT_ARGS=...
  --copy-data-to DIR     copy --dataset-dir to this local directory on every worker before training
  --allow-local-paths    accept --workdir/--dataset-dir that are not gs:// (each worker sees its own disk!)
  --max-attempts N       resume: attempts before giving up [1]
  --retry-delay S        resume: seconds between attempts [60]
  --recreate             resume: delete and recreate the slice even if it looks healthy
  --install              resume: reinstall even if the slice was not recreated
  --stop-timeout S       stop/resume: seconds to wait for trainers to exit after SIGTERM [600]
  --hf-dir URI           import-base: Hugging Face Llama-2 folder (gs:// or a path on worker 0) [OPENCHAT_HF_DIR]
  --hf-out URI           export: output folder (gs://... is uploaded from worker 0)   [OPENCHAT_HF_OUT]
  --ckpt URI             export: checkpoint to convert [WORKDIR/final]
  --stage-dir DIR        worker-0 scratch for prepare/import-base/export [OPENCHAT_STAGE_DIR; /tmp/openchat-stage]
  --worker W             ssh: worker index or all [all]

  --dry-run              print every command (one per line, exactly as it would run) and run none
  -h, --help             this help

Arguments after `--` go to `openchat-jax train` (train, resume) or `openchat-jax prepare`
(prepare), e.g. `-- --config.train.epochs=1`; for ssh they are the remote command.

Example (paper's 13B on a v5p-64 Spot queued resource):
  export OPENCHAT_ZONE=us-east5-a OPENCHAT_TPU_NAME=openchat-13b OPENCHAT_ACCELERATOR_TYPE=v5p-64
  export OPENCHAT_CONFIG=configs/llama2_13b_openchat.py OPENCHAT_WORKDIR=gs://BUCKET/runs/13b
  export OPENCHAT_DATASET_DIR=gs://BUCKET/data/openchat OPENCHAT_INIT_FROM=gs://BUCKET/llama2-13b-jax
  launch/tpu_pod.sh create --queued --spot && launch/tpu_pod.sh install
  launch/tpu_pod.sh resume --queued --spot --max-attempts 50
  launch/tpu_pod.sh export --hf-out gs://BUCKET/runs/13b-hf && launch/tpu_pod.sh delete --queued
EOF
}

# ---------------------------------------------------------------- options
PROJECT=${OPENCHAT_PROJECT:-}
ZONE=${OPENCHAT_ZONE:-}
NAME=${OPENCHAT_TPU_NAME:-}
ACCEL=${OPENCHAT_ACCELERATOR_TYPE:-}
RUNTIME=${OPENCHAT_RUNTIME_VERSION:-}
QUEUED=${OPENCHAT_QUEUED:-0}
PROVISIONING=${OPENCHAT_PROVISIONING:-standard}
VALID_UNTIL=''
WAIT_TIMEOUT=0
POLL=30
CREATE_ARGS=()
SSH_ARGS=()
GIT_URL=${OPENCHAT_GIT_URL:-}
REF=${OPENCHAT_GIT_REF:-}
JAX_SPEC=${OPENCHAT_JAX_SPEC:-'jax[tpu]>=0.7,<0.11'}
PYTHON_VERSION=${OPENCHAT_PYTHON_VERSION:-3.11}
REMOTE_DIR=${OPENCHAT_REMOTE_DIR:-openchat-jax}
VENV=${OPENCHAT_VENV:-openchat-venv}
CONFIG=${OPENCHAT_CONFIG:-}
WORKDIR=${OPENCHAT_WORKDIR:-}
DATASET=${OPENCHAT_DATASET_DIR:-}
INIT_FROM=${OPENCHAT_INIT_FROM:-}
ENV_ITEMS=()
COPY_DATA_TO=''
ALLOW_LOCAL=0
MAX_ATTEMPTS=1
RETRY_DELAY=60
RECREATE=0
FORCE_INSTALL=0
STOP_TIMEOUT=600
HF_DIR=${OPENCHAT_HF_DIR:-}
HF_OUT=${OPENCHAT_HF_OUT:-}
CKPT=''
STAGE_DIR=${OPENCHAT_STAGE_DIR:-/tmp/openchat-stage}
WORKER=all
EXTRA=()

# Called by oc_parse_options for each flag and each option that takes a value.
set_flag() {
  case $1 in
    --queued) QUEUED=1 ;;
    --spot) PROVISIONING=spot ;;
    --preemptible) PROVISIONING=preemptible ;;
    --reserved) PROVISIONING=reserved ;;
    --allow-local-paths) ALLOW_LOCAL=1 ;;
    --recreate) RECREATE=1 ;;
    --install) FORCE_INSTALL=1 ;;
  esac
}
set_option() {
  case $1 in
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
    --name) NAME=$2 ;;
    --accelerator-type) ACCEL=$2 ;;
    --runtime-version) RUNTIME=$2 ;;
    --valid-until) VALID_UNTIL=$2 ;;
    --wait-timeout) WAIT_TIMEOUT=$2 ;;
    --poll-interval) POLL=$2 ;;
    --create-arg) CREATE_ARGS+=("$2") ;;
    --ssh-arg) SSH_ARGS+=("$2") ;;
    --git-url) GIT_URL=$2 ;;
    --ref) REF=$2 ;;
    --jax-spec) JAX_SPEC=$2 ;;
    --python-version) PYTHON_VERSION=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --venv) VENV=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --dataset-dir) DATASET=$2 ;;
    --init-from) INIT_FROM=$2 ;;
    --env) ENV_ITEMS+=("$2") ;;
    --copy-data-to) COPY_DATA_TO=$2 ;;
    --max-attempts) MAX_ATTEMPTS=$2 ;;
    --retry-delay) RETRY_DELAY=$2 ;;
    --stop-timeout) STOP_TIMEOUT=$2 ;;
    --hf-dir) HF_DIR=$2 ;;
    --hf-out) HF_OUT=$2 ;;
    --ckpt) CKPT=$2 ;;
    --stage-dir) STAGE_DIR=$2 ;;
    --worker) WORKER=$2 ;;
  esac
}

oc_command 'create install prepare import-base train resume stop export status ssh delete' "$@"
shift
oc_parse_options '--queued --spot --preemptible --reserved --allow-local-paths --recreate --install' \
  '--project --zone --name --accelerator-type --runtime-version --valid-until --wait-timeout --poll-interval
  --create-arg --ssh-arg --git-url --ref --jax-spec --python-version --remote-dir --venv --config --workdir
  --dataset-dir --init-from --env --copy-data-to --max-attempts --retry-delay --stop-timeout --hf-dir
  --hf-out --ckpt --stage-dir --worker' "$@"

# ---------------------------------------------------------------- checks
oc_require "$ZONE" --zone OPENCHAT_ZONE
oc_require "$NAME" --name OPENCHAT_TPU_NAME
[[ $QUEUED == 0 || $QUEUED == 1 ]] || oc_die "OPENCHAT_QUEUED must be 0 or 1, got '$QUEUED'"
case $PROVISIONING in
  standard | spot | reserved) ;;
  preemptible)
    [[ $QUEUED == 0 ]] || oc_die "--preemptible is for plain TPU VMs; use --spot with --queued"
    ;;
  *) oc_die "OPENCHAT_PROVISIONING must be standard, spot, preemptible or reserved, got '$PROVISIONING'" ;;
esac
for pair in "--wait-timeout:$WAIT_TIMEOUT" "--poll-interval:$POLL" "--max-attempts:$MAX_ATTEMPTS" \
  "--retry-delay:$RETRY_DELAY" "--stop-timeout:$STOP_TIMEOUT"; do
  oc_require_int "${pair#*:}" "${pair%%:*}"
done
((MAX_ATTEMPTS >= 1)) || oc_die "--max-attempts must be at least 1"
((POLL >= 1)) || oc_die "--poll-interval must be at least 1"
safe_rel='^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$'
[[ $REMOTE_DIR =~ $safe_rel ]] || oc_die "--remote-dir must be a plain path relative to the worker's home, got '$REMOTE_DIR'"
[[ $VENV =~ $safe_rel ]] || oc_die "--venv must be a plain path relative to the worker's home, got '$VENV'"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || oc_die "--worker must be a worker index or 'all', got '$WORKER'"
oc_check_env_items "${ENV_ITEMS[@]+"${ENV_ITEMS[@]}"}"

LOC=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  LOC+=("--project=$PROJECT")
fi
# Paths on the workers; `~/` expands there (the names are restricted to safe characters).
# shellcheck disable=SC2088
R_SRC="~/$REMOTE_DIR"
# shellcheck disable=SC2088
R_BIN="~/$VENV/bin/openchat-jax"
R_TARBALL="openchat-jax-src.tar.gz" # in the worker's home (scp's relative destination)

default_runtime() {
  case $ACCEL in
    v4-*) printf tpu-ubuntu2204-base ;;
    v5p-*) printf v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) printf v2-alpha-tpuv5-lite ;;
    v6e-*) printf v2-alpha-tpuv6e ;;
    *) oc_die "no default runtime version for accelerator type '$ACCEL'; pass --runtime-version" ;;
  esac
}

require_run_paths() {
  oc_require_run_paths "$CONFIG" "$WORKDIR" "$DATASET"
  if [[ $ALLOW_LOCAL == 0 ]]; then
    local p
    for p in "--workdir:$WORKDIR" "--dataset-dir:$DATASET"; do
      oc_is_gcs "${p#*:}" || oc_die "${p%%:*} must be a gs:// path on a pod slice (every worker must see it), got '${p#*:}'; pass --allow-local-paths to override"
    done
  fi
  if [[ $CONFIG == /* || $CONFIG == "~"* ]]; then
    oc_die "--config must be relative to the repository root (it is read from the copy on each worker), got '$CONFIG'"
  fi
  if [[ ! -f $OC_REPO_ROOT/$CONFIG ]]; then
    oc_log "warning: $CONFIG not found in $OC_REPO_ROOT; it must exist in the tree installed on the workers"
  fi
}

# ---------------------------------------------------------------- gcloud wrappers
ssh_on() { # ssh_on WORKER REMOTE_COMMAND
  oc_run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" "--worker=$1" "--command=$2" \
    "${SSH_ARGS[@]+"${SSH_ARGS[@]}"}"
}

# The state of the TPU VM (plain) or queued resource, or ABSENT when it does not exist.
read_state() {
  local cmd err out rc=0
  if [[ $QUEUED == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" '--format=value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" '--format=value(state)')
  fi
  if [[ $OC_DRY_RUN == 1 ]]; then
    oc_run "${cmd[@]}"
    printf ASSUMED_HEALTHY
    return
  fi
  err=$(mktemp)
  out=$("${cmd[@]}" 2>"$err") || rc=$?
  if ((rc != 0)); then
    if grep -qiE 'NOT_FOUND|not found|was not found' "$err"; then
      rm -f "$err"
      printf ABSENT
      return
    fi
    oc_log "$(cat "$err")"
    rm -f "$err"
    oc_die "could not read the state of $NAME (exit $rc)"
  fi
  rm -f "$err"
  out=${out//[[:space:]]/}
  printf '%s' "${out:-UNKNOWN}"
}

do_create() {
  oc_require "$ACCEL" --accelerator-type OPENCHAT_ACCELERATOR_TYPE
  local runtime cmd
  runtime=${RUNTIME:-$(default_runtime)}
  if [[ $QUEUED == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${LOC[@]}"
      "--accelerator-type=$ACCEL" "--runtime-version=$runtime")
    if [[ -n $VALID_UNTIL ]]; then
      cmd+=("--valid-until-duration=$VALID_UNTIL")
    fi
  else
    [[ -z $VALID_UNTIL ]] || oc_die "--valid-until needs --queued"
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" "--accelerator-type=$ACCEL" "--version=$runtime")
  fi
  case $PROVISIONING in
    spot) cmd+=(--spot) ;;
    preemptible) cmd+=(--preemptible) ;;
    reserved) cmd+=(--reserved) ;;
  esac
  cmd+=("${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}")
  oc_run "${cmd[@]}"
  wait_ready
}

# Poll until the queued resource is ACTIVE / the TPU VM is READY.
wait_ready() {
  local want=READY
  if [[ $QUEUED == 1 ]]; then
    want=ACTIVE
  fi
  if [[ $OC_DRY_RUN == 1 ]]; then
    read_state >/dev/null
    oc_log "dry-run: would poll the state above every ${POLL}s until $want"
    return
  fi
  local start=$SECONDS state
  while true; do
    state=$(read_state)
    case $state in
      "$want") return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | PREEMPTED | TERMINATED | STOPPED | DELETING | ABSENT)
        oc_die "$NAME is $state while waiting for $want"
        ;;
    esac
    if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
      oc_die "$NAME still $state after ${WAIT_TIMEOUT}s (want $want)"
    fi
    oc_log "$NAME is $state; waiting for $want"
    sleep "$POLL"
  done
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    oc_run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    oc_run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

# ---------------------------------------------------------------- remote commands
remote_install_cmd() {
  # shellcheck disable=SC2088
  local py="~/$VENV/bin/python" fetch
  if [[ -n $GIT_URL ]]; then
    fetch="rm -rf $R_SRC && git clone --quiet $(oc_quote "$GIT_URL") $R_SRC && git -C $R_SRC checkout --quiet $(oc_quote "${REF:-main}")"
  else
    fetch="rm -rf $R_SRC && mkdir -p $R_SRC && tar -xzf ~/$R_TARBALL -C $R_SRC && rm -f ~/$R_TARBALL"
  fi
  # shellcheck disable=SC2016 # expands on the worker
  local steps=(
    'if ! command -v uv >/dev/null 2>&1 && ! test -x ~/.local/bin/uv; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi'
    'export PATH="$HOME/.local/bin:$PATH"'
    "$fetch"
    "uv venv --allow-existing --python $(oc_quote "$PYTHON_VERSION") ~/$VENV"
    "uv pip install --python $py $(oc_quote "$JAX_SPEC")"
    "uv pip install --python $py $R_SRC"
    "$R_BIN --help >/dev/null"
  )
  local out='' step
  for step in "${steps[@]}"; do
    out+="${out:+ && }$step"
  done
  printf '%s' "$out"
}

do_install() {
  local remote
  remote=$(remote_install_cmd)
  if [[ -n $GIT_URL ]]; then
    ssh_on all "$remote"
    return
  fi
  local ref=${REF:-HEAD}
  git -C "$OC_REPO_ROOT" rev-parse --verify --quiet "$ref^{commit}" >/dev/null ||
    oc_die "$OC_REPO_ROOT is not a git checkout with commit '$ref'; pass --git-url URL --ref REF"
  if [[ -n $(git -C "$OC_REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    oc_log "warning: uncommitted changes in $OC_REPO_ROOT are not shipped (git archive $ref)"
  fi
  local tarball="${TMPDIR:-/tmp}/openchat-jax-$NAME-src.tar.gz"
  oc_run git -C "$OC_REPO_ROOT" archive --format=tar.gz "--output=$tarball" "$ref"
  oc_run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$R_TARBALL" "${LOC[@]}" --worker=all \
    "${SSH_ARGS[@]+"${SSH_ARGS[@]}"}"
  oc_run rm -f "$tarball"
  ssh_on all "$remote"
}

env_prefix() {
  if ((${#ENV_ITEMS[@]} > 0)); then
    printf 'env %s ' "$(oc_quote_cmd "${ENV_ITEMS[@]}")"
  fi
}

# The one command every worker runs.
remote_train_cmd() {
  local dataset=$DATASET prefix=''
  if [[ -n $COPY_DATA_TO ]]; then
    local dst
    dst=$(oc_quote "$COPY_DATA_TO")
    if oc_is_gcs "$DATASET"; then
      prefix="mkdir -p $dst && gcloud storage rsync --recursive $(oc_quote "$DATASET") $dst && "
    else
      prefix="mkdir -p $dst && cp -a $(oc_quote "$DATASET")/. $dst && "
    fi
    dataset=$COPY_DATA_TO
  fi
  oc_train_args "$CONFIG" "$WORKDIR" "$dataset" "$INIT_FROM" "${EXTRA[@]+"${EXTRA[@]}"}"
  printf '%scd %s && %s%s %s' "$prefix" "$R_SRC" "$(env_prefix)" "$R_BIN" "$(oc_quote_cmd "${OC_TRAIN_ARGS[@]}")"
}

remote_stop_cmd() {
  # The [o] keeps the pattern from matching the remote shell that runs this very command.
  local pat="'bin/[o]penchat-jax train'" tries=$(((STOP_TIMEOUT + 4) / 5))
  printf '%s' "pkill -TERM -f $pat || true; i=0; while pgrep -f $pat >/dev/null && [ \$i -lt $tries ]; do sleep 5; i=\$((i+1)); done; pkill -KILL -f $pat || true"
}

do_train() {
  local remote
  remote=$(remote_train_cmd)
  ssh_on all "$remote"
}

do_stop() {
  local remote
  remote=$(remote_stop_cmd)
  ssh_on all "$remote"
}

# True when WORKDIR/final exists (the trainer writes it last).
final_exists() {
  if ! oc_is_gcs "$WORKDIR"; then
    return 0 # not checkable from here; trust the trainer's exit status
  fi
  if [[ $OC_DRY_RUN == 1 ]]; then
    oc_run gcloud storage ls "$WORKDIR/final"
    return 0
  fi
  gcloud storage ls "$WORKDIR/final" >/dev/null 2>&1
}

# Bring the slice to a usable state; sets NEED_INSTALL=1 when it was (re)created.
ensure_ready() {
  NEED_INSTALL=0
  local state
  if [[ $RECREATE == 1 ]]; then
    state=RECREATE_REQUESTED
  else
    state=$(read_state)
  fi
  case $state in
    RECREATE_REQUESTED)
      oc_log "--recreate: deleting and recreating $NAME"
      do_delete
      do_create
      NEED_INSTALL=1
      ;;
    ASSUMED_HEALTHY)
      oc_log "dry-run: assuming $NAME is healthy (pass --recreate to see the recreate path)"
      ;;
    ACTIVE | READY) ;;
    ABSENT)
      oc_log "$NAME does not exist; creating it"
      do_create
      NEED_INSTALL=1
      ;;
    ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING | STARTING | RESTARTING | REPAIRING)
      oc_log "$NAME is $state; waiting"
      wait_ready
      NEED_INSTALL=1
      ;;
    *)
      oc_log "$NAME is $state; deleting and recreating it"
      do_delete
      do_create
      NEED_INSTALL=1
      ;;
  esac
}

# Get the slice ready for a train run: recover it, then reinstall (new VM) or stop leftovers.
prepare_slice() {
  ensure_ready
  if [[ $NEED_INSTALL == 1 || $FORCE_INSTALL == 1 ]]; then
    do_install
  else
    do_stop
  fi
}

do_resume() {
  require_run_paths
  # Checked now rather than when a recreate needs them, hours into the run.
  oc_require "$ACCEL" --accelerator-type OPENCHAT_ACCELERATOR_TYPE
  RUNTIME=${RUNTIME:-$(default_runtime)}
  local attempt=1 rc what
  while true; do
    oc_log "resume attempt $attempt of $MAX_ATTEMPTS"
    # A failure while recovering (e.g. the capacity vanished again) costs an attempt, not the run:
    # run it in a subshell with errexit and look at its status.
    set +e
    (
      set -e
      prepare_slice
    )
    rc=$?
    set -e
    if ((rc == 0)); then
      FORCE_INSTALL=0
      RECREATE=0
      what="train exit"
      do_train || rc=$?
      if [[ $OC_DRY_RUN == 1 ]]; then
        final_exists
        return 0
      fi
      if ((rc == 0)) && final_exists; then
        oc_log "training finished: $WORKDIR/final"
        return 0
      fi
    else
      what="recovering the slice failed with exit"
    fi
    if ((attempt >= MAX_ATTEMPTS)); then
      oc_die "training did not finish ($what $rc, attempt $attempt of $MAX_ATTEMPTS); run resume again"
    fi
    oc_log "not finished ($what $rc); retrying in ${RETRY_DELAY}s"
    sleep "$RETRY_DELAY"
    attempt=$((attempt + 1))
  done
}

# Worker-0 jobs write a gs:// destination through a local stage directory (the converters
# and the dataset builder write local files). `stage_for SUBDIR DEST` sets STAGE_OUT (the
# path to write), CLEAN (a prefix that empties the stage) and UPLOAD (a suffix that uploads it
# to DEST); for a non-gs:// DEST, STAGE_OUT=DEST and the other two are empty.
stage_for() {
  local sub=$1 dest=$2
  if oc_is_gcs "$dest"; then
    local stage="$STAGE_DIR/$sub"
    STAGE_OUT=$stage
    UPLOAD=" && gcloud storage rsync --recursive $(oc_quote "$stage") $(oc_quote "$dest") && rm -rf $(oc_quote "$stage")"
    CLEAN="rm -rf $(oc_quote "$stage") && mkdir -p $(oc_quote "$STAGE_DIR") && "
  else
    STAGE_OUT=$dest
    UPLOAD=''
    CLEAN=''
  fi
}

do_prepare() {
  oc_require "$CONFIG" --config OPENCHAT_CONFIG
  oc_require "$DATASET" --dataset-dir OPENCHAT_DATASET_DIR
  stage_for dataset "$DATASET"
  local args=(prepare --config "$CONFIG" "--config.data.dataset_dir=$STAGE_OUT" "${EXTRA[@]+"${EXTRA[@]}"}")
  ssh_on 0 "${CLEAN}cd $R_SRC && $R_BIN $(oc_quote_cmd "${args[@]}")$UPLOAD"
}

do_import_base() {
  oc_require "$HF_DIR" --hf-dir OPENCHAT_HF_DIR
  oc_require "$INIT_FROM" --init-from OPENCHAT_INIT_FROM
  local fetch='' src=$HF_DIR
  if oc_is_gcs "$HF_DIR"; then
    src="$STAGE_DIR/hf-in"
    fetch="rm -rf $(oc_quote "$src") && mkdir -p $(oc_quote "$src") && gcloud storage rsync --recursive $(oc_quote "$HF_DIR") $(oc_quote "$src") && "
  fi
  stage_for jax-out "$INIT_FROM"
  local remote
  remote="${fetch}${CLEAN}$R_BIN $(oc_quote_cmd convert hf-to-jax --hf-dir "$src" --out "$STAGE_OUT" --add-eot)$UPLOAD"
  if [[ -n $fetch ]]; then
    remote+=" && rm -rf $(oc_quote "$src")"
  fi
  ssh_on 0 "$remote"
}

do_export() {
  oc_require "$HF_OUT" --hf-out OPENCHAT_HF_OUT
  oc_export_ckpt "$CKPT" "$WORKDIR"
  stage_for hf-out "$HF_OUT"
  ssh_on 0 "${CLEAN}$R_BIN $(oc_quote_cmd convert jax-to-hf --ckpt "$OC_CKPT" --out "$STAGE_OUT")$UPLOAD"
}

case $COMMAND in
  create) do_create ;;
  install) do_install ;;
  prepare) do_prepare ;;
  import-base) do_import_base ;;
  train)
    require_run_paths
    do_train
    ;;
  resume) do_resume ;;
  stop) do_stop ;;
  export) do_export ;;
  status)
    if [[ $QUEUED == 1 ]]; then
      oc_run gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
    else
      oc_run gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}"
    fi
    ;;
  ssh)
    ((${#EXTRA[@]} > 0)) || oc_die "ssh needs a remote command after --"
    ssh_on "$WORKER" "${EXTRA[*]}"
    ;;
  delete) do_delete ;;
esac
