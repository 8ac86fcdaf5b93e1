#!/usr/bin/env bash
# The GPU performance suite of the README's "Performance" section, one stage per call (each well under 10 minutes
# on one H100). Every run prints one JSON line; the lines are also appended to $RESULTS (default
# outputs/gpu_benchmarks.jsonl), so stages can be run one after another and compared afterwards.
# A run that fails leaves a {"benchmark": "failed", ...} line instead and the stage goes on with its other runs;
# the exit code is then 1.
#
#   bash scripts/gpu_benchmarks.sh smoke | train-l16 | train-b14 | train-s14 | parity | loss | extract | data | e2e |
#                                  predictor | profile | summary | all
#
# Training runs follow the protocol of the anchor (upstream DINOv2 on the same GPU): `vitl16_short.yaml` (batch
# 64, 2 x 224 + 8 local crops of 96 px for patch 16 / 98 px for patch 14, 65536 prototypes, shared head, drop path
# 0.3, block_chunks 4), synthetic pre-collated pinned batches, 10 warm-up + 50 timed iterations, 2 runs.
# Each architecture is measured with fp16 + grad scaler (the anchor's precision) and bf16 without a scaler, each
# plain and compiled (`train.compile=true train.compile_loss=true`; EXTRA="train.compile_loss=false" measures the
# blocks alone). EXTRA="key=value ..." is appended to every training run. MFU is taken against
# PEAK_TFLOPS (default 790: the dense fp16/bf16 matrix rate the anchor's MFU figures use for the H100).
# COMPILE="true" (or "false") runs only that value of `train.compile` (and `train.compile_loss`) in the train-* and
# profile stages. The extract stage measures autocast plain and compiled, then compiled with the backbone cast to
# bf16 (`--cast-weights`), then that with max-autotune-no-cudagraphs.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=${1:-all}
PYTHON=${PYTHON:-python}
RESULTS=${RESULTS:-outputs/gpu_benchmarks.jsonl}
PROFILE_DIR=${PROFILE_DIR:-outputs/profiles}
EXTRA=${EXTRA:-}
PEAK_TFLOPS=${PEAK_TFLOPS:-790}
WARMUP=${WARMUP:-10}  # the protocol; smaller values only for a smoke run
ITERATIONS=${ITERATIONS:-50}
RUNS=${RUNS:-2}
PARITY_ITERATIONS=${PARITY_ITERATIONS:-20}
mkdir -p outputs "$(dirname "$RESULTS")"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package without `pip install -e .`

precision() {  # $1: dtype, $2: grad scaler true|false, $3...: the FSDP mixed_precision keys set to $1 everywhere
  local overrides="compute_precision.grad_scaler=$2" side module key
  for side in student teacher; do
    for module in backbone dino_head ibot_head; do
      for key in "${@:3}"; do
        overrides="$overrides compute_precision.$side.$module.mixed_precision.$key=$1"
      done
    done
  done
  echo "$overrides"
}
BF16=$(precision bf16 false param_dtype reduce_dtype)
FP16=$(precision fp16 true param_dtype)  # upstream's default GPU precision, for bbu_sample.yaml (fp32)
ARCH_L16="student.arch=vit_large student.patch_size=16 crops.local_crops_size=96"
ARCH_B14="student.arch=vit_base student.patch_size=14 crops.local_crops_size=98"
ARCH_S14="student.arch=vit_small student.patch_size=14 crops.local_crops_size=98"
EXTRACT=(scripts/benchmark.py extract --arch vit_large --patch-size 14 --img-size 224 --dtype bf16 --batch-size 256
         --warmup 5)
TRAIN=(scripts/benchmark.py train --config-file dinov2/configs/train/vitl16_short.yaml --warmup "$WARMUP"
       --iterations "$ITERATIONS" --runs "$RUNS" --peak-tflops "$PEAK_TFLOPS")

FAILED=0
failed() {  # $1: what failed, $2: its exit code. One JSON line in $RESULTS; the stage goes on with its next run
  FAILED=$((FAILED + 1))
  "$PYTHON" -c 'import json, sys; print(json.dumps({"benchmark": "failed", "run": sys.argv[1],
                                                    "exit_code": int(sys.argv[2])}))' "$1" "$2" | tee -a "$RESULTS"
}

logged() {  # $1: log file, $2: what runs, then the command: its output to the log; on failure the log's tail, a
  # "failed" line and status 1
  local log=$1 what=$2 rc=0
  shift 2
  "$@" > "$log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] && return 0
  tail -n 40 "$log" >&2
  failed "$what (log: $log)" "$rc"
  return 1
}

bench() {  # one benchmark run (its JSON line to $RESULTS); a failure is recorded, not fatal (device time is scarce)
  local rc=0
  "$PYTHON" "$@" | tee -a "$RESULTS" || rc=$?
  [ "$rc" -eq 0 ] || failed "$*" "$rc"
}

train_arch() {  # $1: the arch overrides
  local precision compile
  for precision in "" "$BF16"; do
    for compile in ${COMPILE:-false true}; do
      # shellcheck disable=SC2086  # the override lists are word lists on purpose
      bench "${TRAIN[@]}" $1 $precision train.compile=$compile train.compile_loss=$compile $EXTRA
    done
  done
}

case "$STAGE" in
  train-l16) train_arch "$ARCH_L16" ;;
  train-b14) train_arch "$ARCH_B14" ;;
  train-s14) train_arch "$ARCH_S14" ;;
  parity)  # 20 iterations vs fp32 without compile, and vs the same precision without compile (see parity.py)
    # shellcheck disable=SC2086
    bench scripts/benchmark.py parity --config-file dinov2/configs/train/vitl16_short.yaml \
      --iterations "$PARITY_ITERATIONS" \
      $ARCH_B14 train.compile=true train.compile_loss=true $EXTRA
    # shellcheck disable=SC2086
    bench scripts/benchmark.py parity --config-file dinov2/configs/train/vitl16_short.yaml \
      --iterations "$PARITY_ITERATIONS" \
      $ARCH_B14 $BF16 train.compile=true train.compile_loss=true $EXTRA
    ;;
  loss)  # the iBOT loss maths per iteration, eager and compiled (train.compile_loss), at the masked-token counts of
    # ViT-B/14 (about 4900, 256 patches) and ViT-L/16 (about 3760, 196 patches) in the anchor's protocol
    for rows in 4992 3840; do
      for compile in "" "--compile"; do
        # shellcheck disable=SC2086
        bench scripts/benchmark.py loss --rows "$rows" --dtype fp16 $compile
      done
    done
    ;;
  extract)
    for variant in "" "--compile" "--compile --cast-weights" \
                   "--compile --cast-weights --compile-mode max-autotune-no-cudagraphs"; do
      # shellcheck disable=SC2086
      bench "${EXTRACT[@]}" --iters 20 $variant
    done
    ;;
  data)  # the CPU paths with 16 workers, and the GPU path (workers + decode/augment on the GPU) end to end; one
    # process per JPEG size, so each size's lines are kept even if a later one is cut short. Each measurement times
    # one wave of 512 samples (16 workers x 32) after an untimed one: about 3 minutes in all on the H100 machine by
    # the rates of 2026-11-24 (an estimate: this stage has not run there in this form yet)
    for size in 640x480 1920x1440 4000x3000; do
      bench scripts/benchmark.py data --num-workers 16 --batch-size 32 --num-samples 512 --repeats 1 \
        --path all --image-size "$size"
    done
    ;;
  e2e)  # real JPEG loading: ViT-S/14 training on generated E2E_SIZE-px photos: CPU fast path, crops.gpu_augmentation
    # on its side stream, and on the training stream
    data_root=${E2E_DATA:-outputs/bbu_e2e_${E2E_SIZE:-1920}}
    [ -d "$data_root" ] || "$PYTHON" scripts/make_sample_bbu.py "$data_root" --groups "${E2E_GROUPS:-40}" \
      --size "${E2E_SIZE:-1920}"
    for variant in "false false" "true true" "true false"; do
      read -r gpu side <<< "$variant"
      out=outputs/e2e_gpu_augmentation_${gpu}_side_stream_$side
      # shellcheck disable=SC2086
      logged "$out.log" "e2e crops.gpu_augmentation=$gpu crops.gpu_side_stream=$side" \
        "$PYTHON" dinov2/train/train.py --config-file dinov2/configs/train/vitl16_short.yaml --output-dir "$out" \
        --no-resume $ARCH_S14 "train.dataset_path=BBU:root=$data_root:split=TRAIN" train.num_workers=16 \
        train.OFFICIAL_EPOCH_LENGTH=80 optim.epochs=1 optim.warmup_epochs=0 train.checkpoint_period=100000 \
        evaluation.eval_period_iterations=0 train.log_period=10 crops.gpu_augmentation=$gpu \
        crops.gpu_side_stream=$side $EXTRA || continue
      "$PYTHON" - "$out" "$gpu" "$side" <<'PY' | tee -a "$RESULTS"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/training_metrics.json")]
timed = [r for r in rows if r["iteration"] >= 20]
batch = int(timed[0]["current_batch_size"])
gpu = sys.argv[2] == "true"
print(json.dumps({"benchmark": "e2e", "gpu_augmentation": gpu, "gpu_side_stream": gpu and sys.argv[3] == "true",
                  "arch": "vit_small/14", "batch_size": batch, "logged_iterations": len(timed),
                  "images_per_s": round(batch / statistics.mean(r["iter_time"] for r in timed), 2)}))
PY
    done
    ;;
  smoke)  # the user's path on the GPU, first of all: run/train/train.sh (sample data; pretraining in fp16 with the grad
    # scaler, checkpoints and teacher evaluations; the three probes in fp16 autocast; summary), then a second call that
    # resumes from the final checkpoint for 2 more epochs
    out=outputs/gpu_smoke
    for run in fresh resumed; do
      if [ "$run" = fresh ]; then epochs=10 no_resume=true; else epochs=12 no_resume=false; fi
      logged "$out.$run.log" "smoke $run" env PYTHON="$PYTHON" OUTPUT_DIR="$out" NO_RESUME=$no_resume \
        EXTRA="$FP16 optim.epochs=$epochs $EXTRA" bash run/train/train.sh || break
      "$PYTHON" - "$out" "$run" <<'PY' | tee -a "$RESULTS"
import json, os, re, sys
out, run = sys.argv[1:]
rows = [json.loads(line) for line in open(os.path.join(out, "training_metrics.json"))]
log = open(os.path.join(out, "logs", "log.txt")).read()
resumed = re.findall(r"Resumed training from checkpoint \S+ at iteration (\d+)", log)
auroc = {}
for probe in ("knn", "linear", "log_regression"):
    results = json.load(open(os.path.join(out, "eval", "final", "teacher", f"results_eval_{probe}.json")))
    (test,) = [v for k, v in results["datasets"].items() if k.endswith("split=TEST")]
    auroc[probe] = round(test["image"]["auroc"], 3)
print(json.dumps({"benchmark": "smoke", "run": run, "last_iteration": rows[-1]["iteration"],
                  "resumed_at": int(resumed[-1]) if run == "resumed" and resumed else None,
                  "final_total_loss": round(rows[-1]["total_loss"], 4), "test_image_auroc": auroc}))
PY
    done
    ;;
  profile)  # traces and operator tables of each architecture (fp16, plain and compiled) and of the extraction
    # (plain and compiled) into $PROFILE_DIR/compile_{false,true}
    for arch in "$ARCH_L16" "$ARCH_B14" "$ARCH_S14"; do
      for compile in ${COMPILE:-false true}; do
        # shellcheck disable=SC2086
        bench "${TRAIN[@]}" --runs 1 --iterations 10 --profile "$PROFILE_DIR/compile_$compile" $arch \
          train.compile=$compile train.compile_loss=$compile $EXTRA
      done
    done
    bench "${EXTRACT[@]}" --iters 5 --profile "$PROFILE_DIR/compile_false"
    bench "${EXTRACT[@]}" --iters 5 --profile "$PROFILE_DIR/compile_true" --compile
    bench "${EXTRACT[@]}" --iters 5 --profile "$PROFILE_DIR/compile_true" --compile --cast-weights
    ;;
  predictor)  # production scoring: ms per device of 3 photos (decode on 4 threads, backbone, classifier)
    for arch in "vit_small 14" "vit_large 14"; do
      set -- $arch
      bench scripts/benchmark.py predictor --arch "$1" --patch-size "$2" --image-size 640x480 1920x1440 4000x3000 \
        --iters 20
    done
    ;;
  summary)  # the results so far as markdown tables against the anchor
    "$PYTHON" scripts/benchmark.py summary --results "$RESULTS"
    ;;
  all)
    for stage in smoke train-l16 train-b14 train-s14 parity loss extract data e2e predictor summary; do
      bash "$0" "$stage" || FAILED=$((FAILED + 1))
    done
    ;;
  *)
    echo "unknown stage '$STAGE': smoke | train-l16 | train-b14 | train-s14 | parity | loss | extract | data | e2e |" \
      "predictor | profile | summary | all" >&2
    exit 2
    ;;
esac
if [ "$FAILED" -gt 0 ]; then
  echo "gpu_benchmarks.sh $STAGE: $FAILED run(s) failed (see the \"failed\" lines in $RESULTS)" >&2
  exit 1
fi
