#!/usr/bin/env bash
# Submit openchat-jax training to a SLURM GPU cluster (several nodes) with sbatch.
set -euo pipefail

OC_SCRIPT=gpu_slurm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh COMMAND [OPTIONS] [-- TRAIN OVERRIDES...]

Submit launch/slurm_train.sbatch: srun starts the same `openchat-jax train` in every task and
jax.distributed auto-detects SLURM. Checkpoints go to --workdir, so a requeued (preempted) or
resubmitted job resumes the run; --chain K queues K jobs back to back (each starts after the
previous ends, for any reason) so a run longer than --time continues by itself.

Commands:
  submit       sbatch the training job (--chain K jobs)
  resume       the same as submit: the new job resumes from the newest checkpoint;
               --after JOBID queues it behind a job that is still running

Options (environment default in brackets):
  --nodes N              nodes [OPENCHAT_SLURM_NODES] (required)
  --gpus-per-node G      GPUs per node [OPENCHAT_GPUS_PER_NODE; 8]
  --procs MODE           per-gpu (one process per GPU) or per-node (one per node, sees all its GPUs)
                         [OPENCHAT_PROCS; per-gpu]
  --cpus-per-task N      CPUs per process (per-node mode: the node's cores, for data loading)
  --partition P          [OPENCHAT_SLURM_PARTITION]
  --account A            [OPENCHAT_SLURM_ACCOUNT]
  --qos Q                [OPENCHAT_SLURM_QOS]
  --time T               time limit per job [OPENCHAT_SLURM_TIME; 24:00:00]
  --job-name NAME        [openchat-jax]
  --log-dir DIR          job logs DIR/NAME-JOBID.out, appended across requeues [logs]
  --chain K              jobs to queue, each after the previous one ends (afterany) [1]
  --after JOBID          the first job waits for JOBID to end (afterany)
  --term-before S        SIGTERM the trainers S seconds before the time limit (they checkpoint
                         and exit) [300]
  --no-requeue           do not requeue the job when it is preempted
  --sbatch-arg ARG       extra sbatch argument (repeatable), e.g. --sbatch-arg=--mem=0
  --config FILE          [OPENCHAT_CONFIG] (required)
  --workdir DIR          shared path or gs:// [OPENCHAT_WORKDIR] (required)
  --dataset-dir DIR      shared path or gs:// [OPENCHAT_DATASET_DIR] (required)
  --init-from DIR        converted base weights (--config.init_from) [OPENCHAT_INIT_FROM]
  --venv DIR             venv on the shared filesystem [OPENCHAT_VENV; REPO/.venv]
  --mem-fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION [0.9]
  --env KEY=VALUE        more environment for every task (repeatable)
  --srun-arg ARG         extra srun argument (repeatable)
  --dry-run              print every command (one per line) and run none; a chained job's
                         dependency shows the previous job as {job N}
  -h, --help             this help

Example (13B on 4 nodes x 8 H100, up to 3 x 24 h):
  launch/gpu_slurm.sh submit --nodes 4 --partition gpu --chain 3 \
      --config configs/llama2_13b_openchat.py --workdir /shared/runs/13b \
      --dataset-dir /shared/data/openchat --init-from /shared/llama2-13b-jax
EOF
}

NODES=${OPENCHAT_SLURM_NODES:-}
GPUS_PER_NODE=${OPENCHAT_GPUS_PER_NODE:-8}
PROCS=${OPENCHAT_PROCS:-per-gpu}
CPUS_PER_TASK=''
PARTITION=${OPENCHAT_SLURM_PARTITION:-}
ACCOUNT=${OPENCHAT_SLURM_ACCOUNT:-}
QOS=${OPENCHAT_SLURM_QOS:-}
TIME=${OPENCHAT_SLURM_TIME:-24:00:00}
JOB_NAME=openchat-jax
LOG_DIR=logs
CHAIN=1
AFTER=''
TERM_BEFORE=300
REQUEUE=1
SBATCH_ARGS=()
CONFIG=${OPENCHAT_CONFIG:-}
WORKDIR=${OPENCHAT_WORKDIR:-}
DATASET=${OPENCHAT_DATASET_DIR:-}
INIT_FROM=${OPENCHAT_INIT_FROM:-}
VENV=${OPENCHAT_VENV:-$OC_REPO_ROOT/.venv}
MEM_FRACTION=${OPENCHAT_MEM_FRACTION:-0.9}
JOB_ARGS=() # passed through to slurm_train.sbatch
EXTRA=()

# Called by oc_parse_options for each flag and each option that takes a value.
set_flag() {
  case $1 in
    --no-requeue) REQUEUE=0 ;;
  esac
}
set_option() {
  case $1 in
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --procs) PROCS=$2 ;;
    --cpus-per-task) CPUS_PER_TASK=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --qos) QOS=$2 ;;
    --time) TIME=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --chain) CHAIN=$2 ;;
    --after) AFTER=$2 ;;
    --term-before) TERM_BEFORE=$2 ;;
    --sbatch-arg) SBATCH_ARGS+=("$2") ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --dataset-dir) DATASET=$2 ;;
    --init-from) INIT_FROM=$2 ;;
    --venv) VENV=$2 ;;
    --mem-fraction) MEM_FRACTION=$2 ;;
    --env | --srun-arg) JOB_ARGS+=("$1" "$2") ;;
  esac
}

oc_command 'submit resume' "$@"
shift
oc_parse_options '--no-requeue' '--nodes --gpus-per-node --procs --cpus-per-task --partition --account --qos
  --time --job-name --log-dir --chain --after --term-before --sbatch-arg --config --workdir --dataset-dir
  --init-from --venv --mem-fraction --env --srun-arg' "$@"

oc_require "$NODES" --nodes OPENCHAT_SLURM_NODES
oc_require_run_paths "$CONFIG" "$WORKDIR" "$DATASET"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || oc_die "--nodes must be a positive integer, got '$NODES'"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || oc_die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
[[ -z $CPUS_PER_TASK || $CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] || oc_die "--cpus-per-task must be a positive integer, got '$CPUS_PER_TASK'"
[[ $CHAIN =~ ^[1-9][0-9]*$ ]] || oc_die "--chain must be a positive integer, got '$CHAIN'"
oc_require_int "$TERM_BEFORE" --term-before
[[ -z $AFTER || $AFTER =~ ^[0-9]+(_[0-9]+)?$ ]] || oc_die "--after must be a SLURM job id, got '$AFTER'"
case $PROCS in
  per-gpu) TASKS=$GPUS_PER_NODE ;;
  per-node) TASKS=1 ;;
  *) oc_die "--procs must be per-gpu or per-node, got '$PROCS'" ;;
esac
if [[ $LOG_DIR == *%* || $LOG_DIR == *,* ]]; then
  oc_die "--log-dir must not contain % or , (got '$LOG_DIR')"
fi
LAUNCH_DIR="$OC_REPO_ROOT/launch"
[[ $LAUNCH_DIR != *,* ]] || oc_die "the repository path must not contain a comma (sbatch --export): $LAUNCH_DIR"

SBATCH=(sbatch --parsable "--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$TASKS"
  "--gpus-per-node=$GPUS_PER_NODE" --exclusive "--time=$TIME" "--signal=TERM@$TERM_BEFORE"
  --open-mode=append "--output=$LOG_DIR/%x-%j.out")
if ((REQUEUE)); then
  SBATCH+=(--requeue)
else
  SBATCH+=(--no-requeue)
fi
[[ -z $PARTITION ]] || SBATCH+=("--partition=$PARTITION")
[[ -z $ACCOUNT ]] || SBATCH+=("--account=$ACCOUNT")
[[ -z $QOS ]] || SBATCH+=("--qos=$QOS")
[[ -z $CPUS_PER_TASK ]] || SBATCH+=("--cpus-per-task=$CPUS_PER_TASK")
SBATCH+=("--export=ALL,OPENCHAT_LAUNCH_DIR=$LAUNCH_DIR")
SBATCH+=("${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}")

JOB=("$LAUNCH_DIR/slurm_train.sbatch" --config "$CONFIG" --workdir "$WORKDIR" --dataset-dir "$DATASET")
[[ -z $INIT_FROM ]] || JOB+=(--init-from "$INIT_FROM")
JOB+=(--venv "$VENV" --procs "$PROCS" --gpus-per-node "$GPUS_PER_NODE" --mem-fraction "$MEM_FRACTION")
JOB+=("${JOB_ARGS[@]+"${JOB_ARGS[@]}"}")
if ((${#EXTRA[@]} > 0)); then
  JOB+=(-- "${EXTRA[@]}")
fi

oc_run mkdir -p "$LOG_DIR"
prev=$AFTER
for ((k = 1; k <= CHAIN; k++)); do
  dep=()
  [[ -z $prev ]] || dep=("--dependency=afterany:$prev")
  if [[ $OC_DRY_RUN == 1 ]]; then
    oc_run "${SBATCH[@]}" "${dep[@]+"${dep[@]}"}" "${JOB[@]}"
    prev="{job $k}"
    continue
  fi
  oc_log "+ $(oc_quote_cmd "${SBATCH[@]}" "${dep[@]+"${dep[@]}"}" "${JOB[@]}")"
  out=$("${SBATCH[@]}" "${dep[@]+"${dep[@]}"}" "${JOB[@]}")
  prev=${out%%;*} # --parsable prints JOBID or JOBID;CLUSTER
  [[ $prev =~ ^[0-9]+$ ]] || oc_die "sbatch printed '$out', not a job id"
  printf 'submitted job %s (%d of %d)\n' "$prev" "$k" "$CHAIN"
done
oc_log "$COMMAND done; logs in $LOG_DIR/$JOB_NAME-JOBID.out"
