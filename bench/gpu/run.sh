#!/usr/bin/env bash
# Decode speed on the GPU host: TileFlow's CUDA backend against Hugging Face transformers on the
# same shapes, measured in the same run (DEVELOPERS.md: "The GPU host").
#
# Run from the repository root on the GPU host, with a `cuda` build of tilectl:
#
#     cargo build --release --features cuda -p tileflow-ctl     # here, then copy to .gpu/
#     TILECTL=.gpu/tilectl OUT=$OUT bench/gpu/run.sh [PRESET...]
#
# Per preset (default: olmoe-1b-7b qwen3-30b-a3b): synthesizes the model straight into a
# scratch store as a tile pack, then
#   * all experts resident: batch 1 (and batch 16 for olmoe-1b-7b), 32-token prompt, 128 new
#     tokens, greedy, the best of 3 generations (as transformers' figure is);
#   * olmoe-1b-7b streaming: device expert budget 15% of the expert bytes, host tier holding
#     every expert (warmed), prefetch depth 0, 1 and 2;
#   * transformers 5.x from the same config.json, bf16, grouped_mm experts, batch 1 and 16;
#   * batch 1 again, ours and transformers alternating on this machine: ROUNDS (default 3)
#     rounds of transformers (best of 3) then ours; $OUT/<preset>-interleaved-b1.json holds each
#     round's pair and the median ratio (ratio_median), the firmer of the two comparisons.
# qwen3-30b-a3b keeps 24 of its 48 layers: its 61 GB checkpoint and pack would not fit the
# 64 GiB disk (every layer keeps its real shapes; transformers gets the same 24 layers).
# Every result is one JSON line in $OUT/<preset>-*.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
TILECTL=${TILECTL:-.gpu/tilectl}
OUT=${OUT:-bench/out}
STATE=${STATE:-/tmp/tileflow-bench}
export TILEFLOW_STATE_DIR=$STATE
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$OUT" "$STATE"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/device.txt"

presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(olmoe-1b-7b qwen3-30b-a3b)
for preset in "${presets[@]}"; do
    layers=()
    hf_layers=0
    if [ "$preset" = qwen3-30b-a3b ]; then
        layers=(--layers 24)
        hf_layers=24
    fi
    "$TILECTL" --offline model rm "$preset" >/dev/null 2>&1 || true
    "$TILECTL" model synth --preset "$preset" --name "$preset" "${layers[@]}" 2>>"$OUT/$preset-log.txt"
    # The pack's tens of GB of dirty pages would otherwise be written back during the first
    # measurement, slowing the host side of every step.
    sync
    batches=(1)
    [ "$preset" = olmoe-1b-7b ] && batches=(1 16)
    for b in "${batches[@]}"; do
        "$TILECTL" bench stream "$preset" --device cuda --batch "$b" --tokens 128 \
            --prompt-tokens 32 --prefetch-depths 0 --warm --repeats 3 --json \
            >"$OUT/$preset-resident-b$b.json" 2>>"$OUT/$preset-log.txt"
    done
    if [ "$preset" = olmoe-1b-7b ]; then
        expert_bytes=$("$TILECTL" --offline model show "$preset" --json | python3 -c \
            'import json,sys; print(json.load(sys.stdin)["expert_bytes"])')
        "$TILECTL" bench stream "$preset" --device cuda --batch 1 --tokens 128 \
            --prompt-tokens 32 --prefetch-depths 0,1,2 --cpu-experts never --warm \
            --device-bytes $((expert_bytes * 15 / 100)) --host-bytes $((expert_bytes + (1 << 30))) \
            --json >"$OUT/$preset-stream15-b1.json" 2>>"$OUT/$preset-log.txt"
    fi
    python3 bench/gpu/hf_decode.py --config "$STATE/models/$preset/config.json" \
        --layers "$hf_layers" --batch "${batches[@]}" >"$OUT/$preset-hf.json" 2>>"$OUT/$preset-log.txt"
    ours_b1="$TILECTL bench stream $preset --device cuda --batch 1 --tokens 128 --prompt-tokens 32"
    ours_b1+=" --prefetch-depths 0 --warm --repeats 3 --json"
    python3 bench/gpu/hf_decode.py --config "$STATE/models/$preset/config.json" \
        --layers "$hf_layers" --batch 1 --rounds "${ROUNDS:-3}" --interleave "$ours_b1" \
        >"$OUT/$preset-interleaved-b1.json" 2>>"$OUT/$preset-log.txt"
    "$TILECTL" --offline model rm "$preset" >/dev/null 2>&1 || rm -rf "$STATE/models/$preset"
done
