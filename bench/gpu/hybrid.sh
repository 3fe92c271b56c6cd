#!/usr/bin/env bash
# Hybrid expert execution on the GPU host (the CPU computes device-tier misses from the host
# tier while the GPU streams others): OLMoE-1B-7B's shapes in bf16, a device expert budget of
# 12.5% of the experts, the host tier holding every expert (warmed), prefetch depths 0 and 1.
#
#     TILECTL=.gpu/tilectl OUT=$OUT bench/gpu/hybrid.sh
#
# In one run, on one synthesized pack: batch 1 and batch 16, each with --cpu-experts never
# (pure streaming), always (every miss on the CPU) and auto (the cost model's split), 128
# new tokens, the best of 2 generations per mode; the CPU kernels against a STREAM-like read
# of the same host-tier slots (--cpu-bandwidth). One JSON line per batch in
# $OUT/hybrid-b<batch>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
TILECTL=${TILECTL:-.gpu/tilectl}
OUT=${OUT:-bench/out}
STATE=${STATE:-/tmp/tileflow-bench}
PRESET=${PRESET:-olmoe-1b-7b}
TOKENS=${TOKENS:-128}
export TILEFLOW_STATE_DIR=$STATE
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$OUT" "$STATE"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/device.txt"
lscpu >"$OUT/lscpu.txt"
"$TILECTL" --offline model rm "$PRESET" >/dev/null 2>&1 || true
"$TILECTL" model synth --preset "$PRESET" --name "$PRESET" 2>>"$OUT/hybrid-log.txt"
sync
show=$("$TILECTL" --offline model show "$PRESET" --json)
expert_bytes=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["expert_bytes"])' "$show")
for b in ${BATCHES:-1 16}; do
    extra=()
    [ "$b" = 1 ] && extra=(--cpu-bandwidth)
    "$TILECTL" bench stream "$PRESET" --device cuda --batch "$b" --tokens "$TOKENS" \
        --prompt-tokens 32 --prefetch-depths ${DEPTHS:-0,1} --cpu-experts never,always,auto --warm --repeats 2 \
        --device-bytes $((expert_bytes / 8)) --host-bytes $((expert_bytes + (1 << 30))) \
        "${extra[@]}" --json >"$OUT/hybrid-b$b.json" 2>>"$OUT/hybrid-log.txt"
done
"$TILECTL" --offline model rm "$PRESET" >/dev/null 2>&1 || rm -rf "$STATE/models/$PRESET"
