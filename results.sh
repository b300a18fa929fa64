#!/usr/bin/env bash
# results.sh -- the README "Results" protocol: pre-train each method on Fashion-MNIST train (60k, 28x28 grey,
# resized to 32 px, 3 channels), then kNN, linear probe and fine-tuning on Fashion-MNIST test (10k).
#
#   apt-get install -y dataset-fashion-mnist     # the data: idx files under /usr/share/datasets/fashion-mnist
#   bash results.sh                              # everything, in order, then the table (CPU: a few hours)
#   bash results.sh mae lut table                # only these steps (a run's eval starts after its pre-training)
#   bash results.sh mae & bash results.sh ibot &  # independent steps in parallel (dtm_mae needs mae's checkpoint)
#   EPOCHS=20 FT_EPOCHS=10 FT_SAMPLES=0 bash results.sh    # a GPU-sized schedule
#
# Steps: mae lut ibot dtm_ema dtm_mae (pre-train + evaluate), random pixels (baselines), table;
# curves (not in the default list): each method for CURVE_EPOCHS epochs with the kNN monitor at every epoch on a fixed
# 10k-train / 2k-test subset, into $OUT/curves/NAME, then curves.png + report.md by analyze.py (resumable: run again).
# Every run writes out/results/NAME/{pretrain,linprobe,finetune}/; a finished step is skipped when run again.
# Model: ViT-mini (vit.SIZES['mini']: width 128, depth 6, 4 heads, 1.2M parameters), patch 4 -> 8x8 = 64 tokens.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python}
OUT=${OUT:-out/results}
EPOCHS=${EPOCHS:-1}            # pre-training epochs of every method (1 = 468 steps of 128 images)
FT_EPOCHS=${FT_EPOCHS:-2}      # fine-tuning epochs ...
FT_SAMPLES=${FT_SAMPLES:-10000}  # ... on this many training images (a fixed random subset; 0 = all 60k)
COMMON="--data fashion-mnist --model mini --img_size 32 --patch_size 4 --seed 0 --num_workers 1"
PRE="$COMMON --batch_size 128 --epochs $EPOCHS --warmup_epochs 0.1 --log_every 50"
DEC="--decoder_dim 128 --decoder_depth 2 --decoder_heads 4"   # the MAE / LUT decoder at this scale

CURVE_EPOCHS=${CURVE_EPOCHS:-3}   # the curves step's pre-training epochs
KNN="--knn_every 1 --knn_train 10000 --knn_val 2000"

done_file() { [ -f "$1" ] && echo "skip: $1 exists"; }

pretrain() {  # NAME SCRIPT ARGS...: pre-train into $OUT/NAME/pretrain
  local name=$1 script=$2; shift 2
  done_file "$OUT/$name/pretrain/done" && return 0
  local t0=$SECONDS
  $PY "$script" $PRE --out_dir "$OUT/$name/pretrain" "$@"
  echo $((SECONDS - t0)) > "$OUT/$name/pretrain/done"   # wall-clock seconds
}

evaluate() {  # NAME CHECKPOINT: kNN + linear probe on cached [CLS] features, then fine-tuning (not for pixels)
  local name=$1 ckpt=$2
  done_file "$OUT/$name/linprobe/results.json" ||
    $PY finetune.py $COMMON --mode linprobe --cache 1 --checkpoint "$ckpt" --out_dir "$OUT/$name/linprobe"
  [ "$ckpt" = pixels ] && return 0
  done_file "$OUT/$name/finetune/results.json" ||
    $PY finetune.py $COMMON --mode finetune --checkpoint "$ckpt" --out_dir "$OUT/$name/finetune" \
      --epochs "$FT_EPOCHS" --train_samples "$FT_SAMPLES" --batch_size 128 --blr 1e-3 --warmup_epochs 0.2 \
      --layer_decay 0.75 --drop_path 0 --mixup 0 --cutmix 0 --rand_augment 0 --reprob 0 --smoothing 0.1
}

step() {
  case $1 in
    mae)     pretrain mae mae.py $DEC --blr 1.5e-3 && evaluate mae "$OUT/mae/pretrain/checkpoint.pt" ;;
    lut)     pretrain lut lut.py $DEC --blr 1.5e-4 && evaluate lut "$OUT/lut/pretrain/checkpoint.pt" ;;
    ibot)    pretrain ibot ibot.py --blr 2e-3 --local_size 16 --local_crops_number 2 --out_dim 1024 --head_hidden 512 \
               --ema_momentum 0.99 --warmup_teacher_temp_epochs "$EPOCHS" &&
             evaluate ibot "$OUT/ibot/pretrain/checkpoint.pt" ;;
    dtm_ema) pretrain dtm_ema dtm.py --blr 5e-3 --ema_momentum 0.99 && evaluate dtm_ema "$OUT/dtm_ema/pretrain/checkpoint.pt" ;;
    dtm_mae) [ -f "$OUT/mae/pretrain/done" ] || step mae
             pretrain dtm_mae dtm.py --blr 5e-3 --teacher "vit:$OUT/mae/pretrain/checkpoint.pt" &&
             evaluate dtm_mae "$OUT/dtm_mae/pretrain/checkpoint.pt" ;;
    curves)  local C="$COMMON --batch_size 128 --epochs $CURVE_EPOCHS --warmup_epochs 0.1 --log_every 50 $KNN --resume auto"
             $PY mae.py $C --out_dir "$OUT/curves/mae" $DEC --blr 1.5e-3
             $PY lut.py $C --out_dir "$OUT/curves/lut" $DEC --blr 1.5e-4
             $PY ibot.py $C --out_dir "$OUT/curves/ibot" --blr 2e-3 --local_size 16 --local_crops_number 2 \
               --out_dim 1024 --head_hidden 512 --ema_momentum 0.99 --warmup_teacher_temp_epochs "$CURVE_EPOCHS"
             $PY dtm.py $C --out_dir "$OUT/curves/dtm_ema" --blr 5e-3 --ema_momentum 0.99
             $PY analyze.py --what curves --log "$OUT/curves/mae" --log "$OUT/curves/lut" --log "$OUT/curves/ibot" \
               --log "$OUT/curves/dtm_ema" --out_dir "$OUT/curves" ;;
    random)  evaluate random none ;;
    pixels)  evaluate pixels pixels ;;
    table)   $PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def res(name, what, key):
    f = os.path.join(out, name, what, 'results.json')
    return f"{json.load(open(f))[key]:.1f}" if os.path.exists(f) else '-'
def schedule(name):
    log = os.path.join(out, name, 'pretrain', 'log.jsonl')
    if not os.path.exists(os.path.join(out, name, 'pretrain', 'done')):
        return '-', '-'
    last = json.loads(open(log).readlines()[-1])
    return f"{last['epoch']:g}", str(last['step'])
print('| backbone | pre-train epochs | steps | kNN top-1 | linear top-1 | fine-tune top-1 |')
print('|---|---:|---:|---:|---:|---:|')
for name in ['pixels', 'random', 'mae', 'lut', 'ibot', 'dtm_ema', 'dtm_mae']:
    ep, steps = schedule(name)
    print(f"| {name} | {ep} | {steps} | {res(name, 'linprobe', 'knn_acc1')} | {res(name, 'linprobe', 'last_acc1')} "
          f"| {res(name, 'finetune', 'last_acc1')} |")
EOF
    ;;
    *) echo "unknown step $1 (mae lut ibot dtm_ema dtm_mae random pixels table curves)" >&2; exit 2 ;;
  esac
}

for s in "${@:-pixels random mae lut ibot dtm_ema dtm_mae table}"; do
  for t in $s; do step "$t"; done
done
