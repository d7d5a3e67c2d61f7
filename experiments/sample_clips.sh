#!/bin/bash
# The sample-clip experiments of the README ("Results on the sample clips"), end to end on a CPU.
# usage: experiments/sample_clips.sh [RUNS_DIR] [DATA_DIR]   (needs ../shared/samples)
# Takes about 3.5 hours on a 2-core machine; set STEPS lower for a quick look.
set -euo pipefail
RUNS=${1:-outputs/sample_clips}
DATA=${2:-outputs/sample_clips/data}
STEPS=${STEPS:-250}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# 1. Three public clips -> face crops; train on two, hold the third out (val = test).
$PY -m data.preprocess --input ../shared/samples --output "$DATA" --workers 2
printf "vid_retalking4_700sq_30fps\nvid_sadtalker_katiehill_512_mpeg4\n" > "$DATA/train.txt"
echo vid_retalking2_844sq_25fps > "$DATA/val.txt"
cp "$DATA/val.txt" "$DATA/test.txt"
$PY -m data.pack "$DATA"

COMMON=(data=lrs2 "data.root=$DATA" data.format=packed data.num_workers=0 data.batch_size=8
        data.val_samples=64 trainer.limit_val_batches=8 trainer.precision=bf16-mixed
        "logger=[wandb,csv]")

# 2. A teacher from scratch: the full Wav2Lip, ground truth only, 300 steps.
$PY train.py experiment=teacher "${COMMON[@]}" trainer.max_steps=300 \
    trainer.val_check_interval=100 seed=0 hydra.run.dir="$RUNS/teacher_s0"
TEACHER="$RUNS/teacher_s0/export/student.pt"

# 3. Students distilled from it, two seeds each, with the full recipe (output + feature + ground
#    truth) as run for the README; the ablation drops terms (output + feature is now the default).
FULL=(distill.teacher_l1=1 distill.feature=1 distill.ground_truth_l1=1)
distil() {  # name seed overrides...
    local name=$1 seed=$2; shift 2
    $PY train.py "${COMMON[@]}" teacher.checkpoint="$TEACHER" trainer.max_steps="$STEPS" \
        trainer.val_check_interval=50 seed="$seed" hydra.run.dir="$RUNS/${name}_s$seed" "$@"
}
for seed in 0 1; do
    distil nota_like_full "$seed" student=nota_like "${FULL[@]}"
    distil slim25_full "$seed" student=slim25 "${FULL[@]}"
    distil nota_like_out "$seed" student=nota_like distill.feature=0 distill.ground_truth_l1=0
    distil nota_like_outfeat "$seed" student=nota_like distill.feature=1 distill.ground_truth_l1=0
done

# 4. Quantization-aware training with moving-average ranges: fake quantization from step 150,
#    BatchNorm frozen at 200, int8 scales at 225 (export/qat_report.json compares it with PTQ).
distil nota_like_qat 0 student=nota_like callbacks=qat callbacks.qat.start_step=150 \
    callbacks.qat.freeze_bn_step=200 callbacks.qat.freeze_observer_step=225 \
    callbacks.qat.calibrate_ranges=false
# QAT fine-tuning the post-training int8 network (activation ranges calibrated by histogram,
# then frozen), BatchNorm never frozen, from step 150 (seed 0) and, the recipe of the defaults,
# from step 225 (two seeds); against post-training int8 of nota_like_outfeat at equal steps.
distil nota_like_qatcal 0 student=nota_like callbacks=qat callbacks.qat.start_step=150 \
    callbacks.qat.freeze_bn_step=null callbacks.qat.freeze_observer_step=150 \
    callbacks.qat.calibrate_ranges=true
for seed in 0 1; do
    distil nota_like_qatlate "$seed" student=nota_like callbacks=qat \
        callbacks.qat.start_step=225 callbacks.qat.freeze_observer_step=225
done

# The CPU presets of benchmark.py, on the same budget and recipe as nota_like_outfeat_s0: a
# preset counts for the benchmark's targets only within 1 dB of nota_like's PSNR to the teacher.
distil cpu_wide 0 student=cpu_wide
distil cpu_fast 0 student=cpu_fast
distil micro 0 student=micro
# Tried and not kept as a preset: cpu_wide with decoder blocks 4-6 at 32/8/4 and a 4-wide head
# ended 5.1 dB below nota_like (15.2 against 20.3 dB), far outside the 1 dB that counts.
distil cpu_lean 0 student=cpu_wide 'student.decoder=[192,192,192,128,32,8,4]' student.head=4

# 5. Tables and curves from the CSV logs, and the side-by-side evaluation on the held-out clip.
#    The README's logs are kept in experiments/logs/<run>/csv/ (this step refreshes them).
$PY experiments/summarize.py "$RUNS" --metrics val/psnr_teacher val/psnr_gt --out "$RUNS/summary"
for run in "$RUNS"/*_s[0-9]; do
    mkdir -p "experiments/logs/$(basename "$run")"
    cp -r "$run/csv" "experiments/logs/$(basename "$run")/"
done
$PY eval.py "$DATA" --split test --teacher "$TEACHER" --samples 64 --threads 1 \
    --student "$RUNS/slim25_full_s0/export/student.pt" \
    --student "$RUNS/nota_like_full_s0/export/student.pt" \
    --student "$RUNS/nota_like_out_s0/export/student.pt" \
    --student "$RUNS/nota_like_outfeat_s0/export/student.pt" \
    --student "$RUNS/nota_like_qat_s0/export/student.pt" \
    --student "$RUNS/cpu_wide_s0/export/student.pt" \
    --student "$RUNS/cpu_fast_s0/export/student.pt" \
    --student "$RUNS/micro_s0/export/student.pt" \
    --program "$RUNS/nota_like_full_s0/export/student_int8.pt2" \
    --program "$RUNS/nota_like_outfeat_s0/export/student_int8.pt2" \
    --program "$RUNS/nota_like_qat_s0/export/student_qat_int8.pt2" \
    --program "$RUNS/nota_like_qatcal_s0/export/student_qat_int8.pt2" \
    --program "$RUNS/nota_like_qatlate_s0/export/student_qat_int8.pt2" --out "$RUNS/eval_s0.md"
$PY eval.py "$DATA" --split test --teacher "$TEACHER" --samples 64 --threads 1 \
    --student "$RUNS/slim25_full_s1/export/student.pt" \
    --student "$RUNS/nota_like_full_s1/export/student.pt" \
    --student "$RUNS/nota_like_out_s1/export/student.pt" \
    --student "$RUNS/nota_like_outfeat_s1/export/student.pt" \
    --program "$RUNS/nota_like_full_s1/export/student_int8.pt2" \
    --program "$RUNS/nota_like_outfeat_s1/export/student_int8.pt2" \
    --program "$RUNS/nota_like_qatlate_s1/export/student_qat_int8.pt2" --out "$RUNS/eval_s1.md"
