# shellcheck shell=bash
# shellcheck disable=SC2034 # variables set here are read by the scripts that source this file
# Shared helpers for the launch scripts. Sourced, never executed.
#
# Conventions every script follows:
# - stdout carries only commands: in --dry-run, each command the script would run, one per
#   line, quoted so that pasting the line into bash runs exactly that argv.
# - stderr carries progress messages and errors ("SCRIPT: error: ..." then exit 2).
# - Options come from flags; most have an OPENCHAT_* environment default.

OC_DRY_RUN=0
# Dry-run lines go to fd 3 (the script's stdout) so they also appear when a helper that
# prints them runs inside $(...).
exec 3>&1
OC_SCRIPT=${OC_SCRIPT:-$(basename "$0")}
# The repository root (launch/..), used for local installs and `git archive`.
OC_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

oc_log() { printf '%s: %s\n' "$OC_SCRIPT" "$*" >&2; }

oc_die() {
  printf '%s: error: %s\n' "$OC_SCRIPT" "$*" >&2
  exit 2
}

# One argument, quoted for bash: left bare when it holds only safe characters, otherwise in
# single quotes (an embedded ' becomes '\'').
oc_quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Several arguments quoted and joined by spaces: one command line.
oc_quote_cmd() {
  local out='' a
  for a in "$@"; do
    out+="${out:+ }$(oc_quote "$a")"
  done
  printf '%s' "$out"
}

# Run a command, or in dry-run print it (one line on stdout) instead.
oc_run() {
  if [[ $OC_DRY_RUN == 1 ]]; then
    printf '%s\n' "$(oc_quote_cmd "$@")" >&3
  else
    oc_log "+ $(oc_quote_cmd "$@")"
    "$@"
  fi
}

# Parsing helper: oc_opt ARG splits `--flag=value` into OC_OPT=--flag OC_VAL=value OC_HAS_VAL=1;
# any other ARG gives OC_OPT=ARG OC_HAS_VAL=0 (the value, if the option takes one, is the next
# argument). Values are never re-split, so `--create-arg --network=x` keeps `--network=x` whole.
oc_opt() {
  if [[ $1 == --*=* ]]; then
    OC_OPT=${1%%=*}
    OC_VAL=${1#*=}
    OC_HAS_VAL=1
  else
    OC_OPT=$1
    OC_VAL=''
    OC_HAS_VAL=0
  fi
}

# `oc_take_value OPT "$@"` after oc_opt: for `--opt value` (no `=`) the value is the next
# argument; it must exist and must not look like an option (so `--zone --dry-run` fails instead
# of running for real), except for the pass-through options named --*-arg. The caller then
# shifts once more when OC_HAS_VAL was 0.
oc_take_value() {
  local opt=$1
  shift
  if ((OC_HAS_VAL == 1)); then
    return 0
  fi
  (($# > 0)) || oc_die "option $opt needs a value"
  if [[ $1 == -* && $opt != *-arg ]]; then
    oc_die "option $opt needs a value, got option '$1' (write $opt=$1 if that is the value)"
  fi
  OC_VAL=$1
}

# `oc_in_list WORD 'NAME...'`: true when WORD is one of the whitespace-separated NAMEs (plain
# words: no glob characters).
oc_in_list() {
  local name
  for name in $2; do
    if [[ $1 == "$name" ]]; then
      return 0
    fi
  done
  return 1
}

# The command word, the script's first argument: `oc_command 'WORD...' "$@"` sets COMMAND when
# it is one of the space-separated WORDs; the caller then shifts it off. No argument: the
# script's usage() on stderr, exit 2; -h or --help: usage() on stdout, exit 0; anything else fails.
oc_command() {
  local words=$1
  shift
  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
  esac
  oc_in_list "$1" "$words" || oc_die "unknown command '$1' (one of: $words); see --help"
  COMMAND=$1
}

# The options after the command word: `oc_parse_options 'FLAG...' 'OPTION...' "$@"`, each list
# whitespace-separated names. -h/--help (usage() on stdout, exit 0) and --dry-run (OC_DRY_RUN=1)
# are handled here; any other FLAG calls the script's set_flag NAME, and each OPTION (`--opt value`
# or `--opt=value`, see oc_take_value) calls its set_option NAME VALUE. The arguments after `--`
# go to the array EXTRA. An unknown option, or a value given to a flag, fails.
oc_parse_options() {
  local flags=$1 options=$2
  shift 2
  while (($#)); do
    oc_opt "$1"
    shift
    if [[ $OC_OPT == -- ]]; then
      EXTRA=("$@")
      return 0
    elif oc_in_list "$OC_OPT" "-h --help --dry-run $flags"; then
      ((OC_HAS_VAL == 0)) || oc_die "option $OC_OPT takes no value"
      case $OC_OPT in
        -h | --help)
          usage
          exit 0
          ;;
        --dry-run) OC_DRY_RUN=1 ;;
        *) set_flag "$OC_OPT" ;;
      esac
    elif oc_in_list "$OC_OPT" "$options"; then
      oc_take_value "$OC_OPT" "$@"
      ((OC_HAS_VAL == 1)) || shift
      set_option "$OC_OPT" "$OC_VAL"
    else
      oc_die "unknown option '$OC_OPT'; see --help"
    fi
  done
}

# `oc_require VALUE --flag [ENV_NAME]`: fail with a message naming the flag when VALUE is empty.
oc_require() {
  local value=$1 flag=$2 env=${3:-}
  if [[ -z $value ]]; then
    if [[ -n $env ]]; then
      oc_die "missing required option $flag (or set $env); see --help"
    fi
    oc_die "missing required option $flag; see --help"
  fi
}

# `oc_require_run_paths CONFIG WORKDIR DATASET`: fail unless --config, --workdir and --dataset-dir
# are all set (every train command needs the three).
oc_require_run_paths() {
  oc_require "$1" --config OPENCHAT_CONFIG
  oc_require "$2" --workdir OPENCHAT_WORKDIR
  oc_require "$3" --dataset-dir OPENCHAT_DATASET_DIR
}

oc_require_int() {
  local value=$1 flag=$2
  [[ $value =~ ^[0-9]+$ ]] || oc_die "option $flag must be a non-negative integer, got '$value'"
}

oc_is_gcs() { [[ $1 == gs://* ]]; }

# The `openchat-jax train` arguments shared by every launcher: the same list on every worker
# and process. Usage: oc_train_args CONFIG WORKDIR DATASET INIT_FROM [OVERRIDES...]; result in
# the array OC_TRAIN_ARGS.
oc_train_args() {
  local config=$1 workdir=$2 dataset=$3 init_from=$4
  shift 4
  OC_TRAIN_ARGS=(train --config "$config" "--config.workdir=$workdir" "--config.data.dataset_dir=$dataset")
  if [[ -n $init_from ]]; then
    OC_TRAIN_ARGS+=("--config.init_from=$init_from")
  fi
  OC_TRAIN_ARGS+=("$@")
}

# The checkpoint that `export` converts: `oc_export_ckpt CKPT WORKDIR` sets OC_CKPT to CKPT, or
# when that is empty to WORKDIR/final (then --workdir is required).
oc_export_ckpt() {
  OC_CKPT=$1
  if [[ -z $OC_CKPT ]]; then
    oc_require "$2" --workdir OPENCHAT_WORKDIR
    OC_CKPT="$2/final"
  fi
}

# Check `--env KEY=VALUE` items; they become an `env KEY=VALUE ...` prefix of the command.
oc_check_env_items() {
  local item
  for item in "$@"; do
    [[ $item =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || oc_die "--env takes KEY=VALUE, got '$item'"
  done
}

# Retry counts and delays.
oc_sleep() {
  if [[ $OC_DRY_RUN != 1 ]]; then
    sleep "$1"
  fi
}
