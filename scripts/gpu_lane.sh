#!/usr/bin/env bash
# One prepared GPU session, as steps (STEPS, space separated, run in this order):
#   speed      the benchmark GPU lane gated against baselines/gpu_budgets.json (CUDA = CPU
#              agreement, asr/forward ratio, absolute budgets); RECORD=1 re-records the budgets
#              for this card first (--update-baselines) and copies the file to $OUT
#   clip       clip sensitivity of clipped_asr, resnet20+56, erk/lamp at 0.9, full test split,
#              calibration seeds 0-2 (scripts/repair_ablation.py)
#   shrinkage  shrinkage ablation, resnet20+56, erk/lamp at 0.9/0.95, full split, seeds 0-2
#   train      short dense training of CIFAR ResNet-18 on cifar10-jpeg (needs the train split)
#              and a slice of studies/paper.toml on it (erk/lamp, 0.90/0.95, seed 0)
# Each step has its own time limit (seconds, STEP_LIMIT_<step>) so one slow step cannot eat
# the others' device time; the ablations append their rows to $OUT/<step>.jsonl as they finish.
# The ablations need only <assets>/weights and <assets>/cache holding the calibration draws
# (data.calibration_set caches them) plus the test split (cache or JPEG folder).
# Usage: SPARSE_REPAIR_ASSETS=DIR OUT=DIR STEPS="speed clip" bash scripts/gpu_lane.sh
set -uo pipefail
OUT=${OUT:-results/gpu}
STEPS=${STEPS:-speed clip shrinkage}
EPOCHS=${EPOCHS:-15}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

limit() { local v="STEP_LIMIT_$1"; echo "${!v:-${2}}"; }

for step in $STEPS; do
  start=$(date +%s)
  echo "== $step"
  case $step in
    speed)
      if [ "${RECORD:-0}" = 1 ]; then
        timeout "$(limit speed 240)" python3 -m pytest benchmarks/test_repair_speed.py --gpu \
          --update-baselines -q -p no:cacheprovider -k gpu 2>&1 | tail -5
        cp baselines/gpu_budgets.json "$OUT/"
      fi
      timeout "$(limit speed 240)" python3 -m pytest benchmarks/test_repair_speed.py --gpu -q \
        -p no:cacheprovider -k gpu -rxXfE --benchmark-json="$OUT/gpu_gate.json" 2>&1 | tail -20
      python3 - "$OUT/gpu_gate.json" <<'EOF'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    info = b.get("extra_info", {})
    if "asr" in info:
        print(b["name"], {m: round(v["ratio"], 3) for m, v in info.items()
                          if isinstance(v, dict) and "ratio" in v})
EOF
      ;;
    clip)
      timeout "$(limit clip 150)" python3 scripts/repair_ablation.py clip \
        --models resnet20,resnet56 --allocations erk,lamp --sparsities 0.9 --seeds 0,1,2 \
        --n-eval full --device cuda --jsonl "$OUT/clip.jsonl" 2>&1 | tail -22
      ;;
    shrinkage)
      timeout "$(limit shrinkage 200)" python3 scripts/repair_ablation.py shrinkage \
        --models resnet20,resnet56 --allocations erk,lamp --sparsities 0.9,0.95 --seeds 0,1,2 \
        --n-eval full --device cuda --jsonl "$OUT/shrinkage.jsonl" 2>&1 | tail -18
      ;;
    train)
      timeout "$(limit train 300)" python3 -m sparse_repair.cli train --json --model resnet18 \
        --dataset cifar10-jpeg --epochs "$EPOCHS" --device cuda \
        --out "$OUT/resnet18-cifar10jpeg.pt" 2>/dev/null > "$OUT/train_resnet18.json"
      cat "$OUT/train_resnet18.json"
      for a in erk lamp; do for s in 0.9 0.95; do
        python3 -m sparse_repair.cli run --model resnet18 --dataset cifar10-jpeg \
          --weights "$OUT/resnet18-cifar10jpeg.pt" --allocation $a --sparsity $s \
          --repair none,bn_recal,asr,clipped_asr --calib 1024 --seed 0 --device cuda --json \
          > "$OUT/run_resnet18_${a}_${s}.json" 2>/dev/null
        python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], [(x['repair'], round(x['top1'],2), round(x['seconds'],3)) for x in r])" "$OUT/run_resnet18_${a}_${s}.json"
      done; done
      rm -f "$OUT/resnet18-cifar10jpeg.pt"
      ;;
    *) echo "unknown step '$step' (speed, clip, shrinkage, train)"; exit 2 ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s"
done
