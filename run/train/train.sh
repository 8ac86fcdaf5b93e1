#!/usr/bin/env bash
# DINOv2 pretraining on a BBU dataset, then k-NN / linear / log-reg probes of the final teacher and of a random
# backbone (baseline), then one summary table. With no variables set it is the CPU demo on the sample dataset.
#
#   NPROC       processes per node (default: number of visible GPUs, 1 without GPU)
#   NNODES      nodes (default 1)
#   CONFIG      training config (default dinov2/configs/train/bbu_sample.yaml)
#   OUTPUT_DIR  run directory (default outputs/bbu_sample)
#   DATA_ROOT   BBU dataset root: TRAIN split for pretraining, TRAIN/VAL/TEST for the probes
#               (default data/bbu_sample, generated with scripts/make_sample_bbu.py --groups $SAMPLE_GROUPS if missing;
#               SAMPLE_GROUPS default 100 devices = 300 images, split 60/20/20 by device)
#   CHECK       quick|full|false (default quick): check DATA_ROOT first (dinov2.data.check; quick: annotations, groups
#               leaking across splits, duplicate paths, missing files; full: also decodes every image and finds
#               identical files under different paths); errors stop the run before it trains
#   DATASET     pretraining dataset string (default BBU:root=$DATA_ROOT:split=TRAIN), e.g. an unlabelled pool
#   NO_RESUME   true|false (default false): true starts fresh instead of resuming from OUTPUT_DIR's checkpoints
#   EXTRA       more key=value config overrides, e.g. "optim.epochs=20 train.batch_size_per_gpu=32"
#   LINEAR_OPTS extra options of the linear probe (default --epochs 10 --epoch-length 50: 500 SGD iterations on
#               cached features, plenty for a few thousand images; upstream uses 10 x 1250 for ImageNet)
#   PYTHON      python interpreter (default: python from PATH)
#   RDZV_ENDPOINT  host:port of the rendezvous when NNODES > 1 (run this script on every node); RDZV_ID (dinov2)
#   NODE_RANK   with NNODES > 1, required: this node's index 0..NNODES-1. Node 0 prepares and checks the data and,
#               after pretraining, runs the evaluation, export and the rest (OUTPUT_DIR must be shared); the other
#               nodes only train
#   EVAL_OPTS   options for the three probes (default: --resize-size S --crop-size S --num-workers W with
#               S = crops.global_crops_size and W = train.num_workers of the run's config.yaml)
#   EXPORT      auto|true|false (default auto): export the teacher with its linear probe to ONNX
#               ($OUTPUT_DIR/export/model.onnx, checked on the TEST split); auto = when onnx and onnxruntime are
#               installed (pip install -e '.[export]')
#   EXPLAIN     true|false (default true): heat maps of the TEST devices the teacher's linear probe decides positive,
#               anomaly maps against the TRAIN split's negative photos ($OUTPUT_DIR/explain/report.html, at most 50
#               devices; dinov2.eval.explain)
#   CONVERT     auto|true|false (default auto): the teacher in the hub, timm and HF layouts, each checked
#               ($OUTPUT_DIR/convert; dinov2.hub.convert); auto = when safetensors is installed
#               (pip install -e '.[convert]')
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-1}"
CONFIG="${CONFIG:-dinov2/configs/train/bbu_sample.yaml}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/bbu_sample}"
DATA_ROOT="${DATA_ROOT:-data/bbu_sample}"
DATASET="${DATASET:-BBU:root=${DATA_ROOT}:split=TRAIN}"
NO_RESUME="${NO_RESUME:-false}"
EXTRA="${EXTRA:-}"
LINEAR_OPTS="${LINEAR_OPTS:---epochs 10 --epoch-length 50}"
EXPORT="${EXPORT:-auto}"
EXPLAIN="${EXPLAIN:-true}"
CHECK="${CHECK:-quick}"
CONVERT="${CONVERT:-auto}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi

if [[ "$NNODES" == 1 ]]; then
    LAUNCH=(--standalone)  # a free local port
    NODE_RANK=0
elif [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the same on every node)" >&2; exit 2
elif ! [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
    echo "NNODES=$NNODES needs NODE_RANK=0..$((NNODES - 1)) (node 0 evaluates after pretraining), got" \
        "'${NODE_RANK:-}'" >&2; exit 2
else
    LAUNCH=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-dinov2}")
fi

case "$EXPORT" in
    auto) if "$PYTHON" -c 'import onnx, onnxruntime' 2>/dev/null; then EXPORT=true; else EXPORT=false; fi ;;
    true | false) ;;
    *) echo "EXPORT must be auto, true or false, got '$EXPORT'" >&2; exit 2 ;;
esac

case "$CONVERT" in
    auto) if "$PYTHON" -c 'import safetensors' 2>/dev/null; then CONVERT=true; else CONVERT=false; fi ;;
    true | false) ;;
    *) echo "CONVERT must be auto, true or false, got '$CONVERT'" >&2; exit 2 ;;
esac

case "$EXPLAIN" in
    true | false) ;;
    *) echo "EXPLAIN must be true or false, got '$EXPLAIN'" >&2; exit 2 ;;
esac

case "$CHECK" in
    quick) CHECK_FLAGS=(--no-decode) ;;
    full) CHECK_FLAGS=() ;;
    false) ;;
    *) echo "CHECK must be quick, full or false, got '$CHECK'" >&2; exit 2 ;;
esac

case "$NO_RESUME" in
    true) RESUME_FLAG=(--no-resume) ;;
    false) RESUME_FLAG=() ;;
    *) echo "NO_RESUME must be true or false, got '$NO_RESUME'" >&2; exit 2 ;;
esac

if [[ "$NODE_RANK" == 0 && ! -f "$DATA_ROOT/annotations/train.json" ]]; then
    echo "== generating the sample BBU dataset in $DATA_ROOT"
    "$PYTHON" scripts/make_sample_bbu.py "$DATA_ROOT" --groups "${SAMPLE_GROUPS:-100}"
fi

if [[ "$NODE_RANK" == 0 && "$CHECK" != false ]]; then
    echo "== checking the dataset in $DATA_ROOT ($CHECK)"
    if ! "$PYTHON" -m dinov2.data.check "BBU:root=$DATA_ROOT" ${CHECK_FLAGS[@]+"${CHECK_FLAGS[@]}"}; then
        echo "The dataset check found errors (above): fix them, or run with CHECK=false" >&2
        exit 1
    fi
fi

echo "== pretraining: $NNODES node(s) x $NPROC process(es), config $CONFIG, output $OUTPUT_DIR"
# shellcheck disable=SC2086  # EXTRA is a list of overrides
"$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" --nproc_per_node="$NPROC" --nnodes="$NNODES" \
    dinov2/train/train.py --config-file "$CONFIG" --output-dir "$OUTPUT_DIR" ${RESUME_FLAG[@]+"${RESUME_FLAG[@]}"} \
    "train.dataset_path=$DATASET" $EXTRA
if [[ "$NODE_RANK" != 0 ]]; then
    echo "== node $NODE_RANK: pretraining done; node 0 evaluates the teacher"
    exit 0
fi

EVAL_CONFIG="$OUTPUT_DIR/config.yaml"
cfg_value() {  # $1 = python expression of the run's resolved config `c`
    local code='import sys; from omegaconf import OmegaConf; c = OmegaConf.load(sys.argv[1]); print(eval(sys.argv[2]))'
    "$PYTHON" -c "$code" "$EVAL_CONFIG" "$1"
}
LAST_EVAL="$OUTPUT_DIR/eval/training_$(cfg_value 'c.optim.epochs * c.train.OFFICIAL_EPOCH_LENGTH - 1')"
TEACHER="$LAST_EVAL/teacher_checkpoint.pth"
if [[ ! -f "$TEACHER" ]]; then
    echo "the final teacher $TEACHER does not exist" >&2
    exit 1
fi
echo "== evaluating $TEACHER"

TRAIN_SPLIT="BBU:root=${DATA_ROOT}:split=TRAIN"
VAL_SPLIT="BBU:root=${DATA_ROOT}:split=VAL"
TEST_SPLIT="BBU:root=${DATA_ROOT}:split=TEST"
if [[ -z "${EVAL_OPTS:-}" ]]; then
    EVAL_OPTS="$(cfg_value '"--resize-size {0} --crop-size {0} --num-workers {1}".format(
        c.crops.global_crops_size, c.train.num_workers)')"
fi

run_probes() {  # $1 = weights, $2 = output directory (the three probes share its feature cache)
    local weights="$1" out="$2"
    # shellcheck disable=SC2086  # EVAL_OPTS is a list of options
    "$PYTHON" -m dinov2.eval.knn --config-file "$EVAL_CONFIG" --pretrained-weights "$weights" --output-dir "$out" \
        --train-dataset "$TRAIN_SPLIT" --val-dataset "$TEST_SPLIT" $EVAL_OPTS
    # shellcheck disable=SC2086
    "$PYTHON" -m dinov2.eval.linear --config-file "$EVAL_CONFIG" --pretrained-weights "$weights" --output-dir "$out" \
        --train-dataset "$TRAIN_SPLIT" --val-dataset "$VAL_SPLIT" --test-datasets "$TEST_SPLIT" \
        $EVAL_OPTS $LINEAR_OPTS
    # shellcheck disable=SC2086
    "$PYTHON" -m dinov2.eval.log_regression --config-file "$EVAL_CONFIG" --pretrained-weights "$weights" \
        --output-dir "$out" --train-dataset "$TRAIN_SPLIT" --val-dataset "$VAL_SPLIT" --test-datasets "$TEST_SPLIT" \
        $EVAL_OPTS
}

run_probes "$TEACHER" "$OUTPUT_DIR/eval/final/teacher"
run_probes random "$OUTPUT_DIR/eval/final/random"

echo "== summary (teacher of $LAST_EVAL vs random initialisation)"
"$PYTHON" -m dinov2.eval.summary \
    --eval-dir "$OUTPUT_DIR/eval/final/teacher" --baseline-dir "$OUTPUT_DIR/eval/final/random"
CLASSIFIER="$OUTPUT_DIR/eval/final/teacher/linear_classifier.pth"
if [[ "$EXPORT" == true ]]; then
    echo "== ONNX export of the teacher and its linear probe, checked against torch on $TEST_SPLIT"
    "$PYTHON" -m dinov2.eval.export --config-file "$EVAL_CONFIG" --pretrained-weights "$TEACHER" \
        --classifier "$CLASSIFIER" --check-datasets "$TEST_SPLIT" --output-dir "$OUTPUT_DIR/export"
else
    echo "== ONNX export skipped (EXPORT=false, or onnx / onnxruntime not installed: pip install -e '.[export]')"
fi
if [[ "$EXPLAIN" == true ]]; then
    echo "== heat maps of the $TEST_SPLIT devices decided positive by the teacher's linear probe"
    "$PYTHON" -m dinov2.eval.explain --config-file "$EVAL_CONFIG" --pretrained-weights "$TEACHER" \
        --classifier "$CLASSIFIER" --datasets "$TEST_SPLIT" --anomaly-reference "$TRAIN_SPLIT" \
        --output-dir "$OUTPUT_DIR/explain"
fi
if [[ "$CONVERT" == true ]]; then
    echo "== the teacher in upstream's hub, timm and HF transformers layouts, each checked against it"
    "$PYTHON" -m dinov2.hub.convert --config-file "$EVAL_CONFIG" --pretrained-weights "$TEACHER" \
        --output-dir "$OUTPUT_DIR/convert"
fi
echo "== to score new images with the teacher and its linear probe (README: Scoring new images):"
echo "$PYTHON -m dinov2.eval.predict --config-file $EVAL_CONFIG --pretrained-weights $TEACHER" \
    "--classifier $CLASSIFIER --datasets BBU:root=<root>:annotation_file=<json>" \
    "--output-dir <dir>"
