#!/usr/bin/env bash
# One prepared GPU session: the benchmark GPU lane (records budgets for this card, then gates
# against them), a short dense training of CIFAR ResNet-18 on cifar10-jpeg, and a slice of
# studies/paper.toml (resnet18, erk/lamp, 0.90/0.95, seed 0) on that checkpoint.
# Usage: SPARSE_REPAIR_ASSETS=DIR OUT=DIR EPOCHS=15 bash scripts/gpu_lane.sh
set -uo pipefail
OUT=${OUT:-results/gpu}
EPOCHS=${EPOCHS:-15}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest benchmarks/test_repair_speed.py --gpu --update-baselines -q -p no:cacheprovider \
  -k gpu --benchmark-json="$OUT/gpu_record.json" 2>&1 | tail -25
cp baselines/gpu_budgets.json "$OUT/" 2>/dev/null
python3 -m pytest benchmarks/test_repair_speed.py --gpu -q -p no:cacheprovider -k gpu \
  --benchmark-json="$OUT/gpu_gate.json" 2>&1 | tail -8
timeout 300 python3 -m sparse_repair.cli train --model resnet18 --dataset cifar10-jpeg --epochs "$EPOCHS" \
  --device cuda --out "$OUT/resnet18-cifar10jpeg.pt" 2>/dev/null > "$OUT/train_resnet18.json"
cat "$OUT/train_resnet18.json"
for a in erk lamp; do for s in 0.9 0.95; do
  python3 -m sparse_repair.cli run --model resnet18 --dataset cifar10-jpeg \
    --weights "$OUT/resnet18-cifar10jpeg.pt" --allocation $a --sparsity $s \
    --repair none,bn_recal,asr,clipped_asr --calib 1024 --seed 0 --device cuda --json \
    > "$OUT/run_resnet18_${a}_${s}.json" 2>/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], [(x['repair'], round(x['top1'],2), round(x['seconds'],3)) for x in r])" "$OUT/run_resnet18_${a}_${s}.json"
done; done
rm -f "$OUT/resnet18-cifar10jpeg.pt"
