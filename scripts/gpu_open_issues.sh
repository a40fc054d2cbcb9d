#!/usr/bin/env bash
# The GPU measurements issues 28, 29 and 30 still need, in calls that fit the lent machine's
# 10-minute limit, each writing its JSON under $OUT as results come (docs/benchmarks.md says
# what each measures). On the device machine, from the repository root, with .bench built by
#   ../shared/tools/gpu-carry --pairs --wheel memeff==0.3.1 --wheel liger-kernel==0.8.5
# run one stage a call:
#   bash scripts/gpu_open_issues.sh kernels   # 28: fused kernels, MiniLM step/profile/e2e; 29: 65k stream
#   bash scripts/gpu_open_issues.sh loss      # 30: bf16 errors of the options, shared cases vs memeff
#   bash scripts/gpu_open_issues.sh ablation  # 30: SciFact ablation of the options, 1M shared cases
set -u
stage=${1:-}
case $stage in kernels | loss | ablation) ;; *) echo "usage: $0 kernels|loss|ablation"; exit 2 ;; esac
source .bench/run/setup.sh > /tmp/setup.log 2>&1 || { tail -30 /tmp/setup.log; exit 1; }
tail -1 /tmp/setup.log
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
G=$(python -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name() else 'h100')")
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log under $OUT, print the tail
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? at ${SECONDS}s"; grep -v '^ ' "$OUT/$name.log" | tail -12 | cut -c1-300
}
case $stage in
kernels)
    step kernels 70 python scripts/bench_layer_norm.py --layers --output "$OUT/pack_kernels_$G.json"
    python scripts/make_bench_pairs.py --output /tmp/pairs.jsonl --count 70000 > /dev/null
    step pack 215 python scripts/bench_pack.py --pairs /tmp/pairs.jsonl --budget 170 \
        --tables checks minilm profile e2e --negatives 0 --compile-modes --e2e-steps 3 \
        --output "$OUT/pack_fused_$G.json"
    python scripts/bench_stream.py make --output /tmp/s.jsonl --count 450000 --synthetic > /dev/null
    step stream $((560 - SECONDS)) python scripts/bench_stream.py train --pairs /tmp/s.jsonl \
        --batch 65536 --steps 5 --workers 12 --chunk 512 --output "$OUT/stream_65k_$G.json" ;;
loss)
    step errors 110 python scripts/check_loss_gpu.py --options --batches 4096 8192 \
        --dtypes bf16 fp32 --output "$OUT/options_errors_$G.json"
    step shared64 200 python scripts/bench_loss.py --shared --batches 65536 --dims 384 768 1024 \
        --output "$OUT/loss_shared_64k_$G.json"
    step shared256 $((570 - SECONDS)) python scripts/bench_loss.py --shared --batches 262144 \
        --dims 768 --output "$OUT/loss_shared_256k_$G.json" ;;
ablation)
    step ablation 330 python scripts/bench_objectives.py options --output "$OUT/options_scifact_$G.json"
    step shared1m $((570 - SECONDS)) python scripts/bench_loss.py --shared --batches 1048576 \
        --dims 768 --cases infonce symmetric matryoshka joint3 --output "$OUT/loss_shared_1m_$G.json" ;;
esac
