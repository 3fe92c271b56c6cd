#!/usr/bin/env python3
"""Hugging Face transformers' decode speed on the shapes of a TileFlow model: the baseline that
bench/gpu/run.sh measures in the same run as ours.

The model is built from the pack's config.json with random bf16 weights straight on the GPU
(speed does not depend on the weights' values, and no checkpoint has to fit the disk), every
expert resident, `experts_implementation="grouped_mm"`, greedy generation with the KV cache.

    python3 bench/gpu/hf_decode.py --config DIR/config.json [--batch 1] [--prompt-tokens 32]
        [--new-tokens 128] [--repeats 3] [--rounds N --interleave CMD]

Prints one JSON line: tokens per second of the decode steps (prefill excluded, measured as
the difference between a 1-token and an N-token generation), per batch, and the device.

With --interleave, the same machine alternates between transformers and our engine: each of
--rounds rounds measures transformers (best of --repeats, every batch) and then runs CMD (a
shell command printing `tilectl bench stream --json`'s line), so that both see the same
host; the line then also holds every round's pair and the median, lowest and highest ratio
ours / transformers at the first batch. `results` holds the median over rounds per batch.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def build(config_path, layers):
    cfg = AutoConfig.from_pretrained(config_path)
    if layers:
        cfg.num_hidden_layers = layers
    kwargs = dict(dtype=torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(
                cfg, experts_implementation="grouped_mm", **kwargs
            )
        impl = "grouped_mm"
    except (TypeError, ValueError) as e:
        print(json.dumps({"warning": f"grouped_mm refused ({e}); eager experts"}), flush=True)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, **kwargs)
        impl = "eager"
    return model.eval(), impl


def timed_generate(model, ids, new_tokens):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return time.perf_counter() - t0


def measure(model, vocab, batches, prompt_tokens, new_tokens, repeats):
    """Decode seconds per step for each batch size: the best of `repeats`."""
    out = {}
    for batch in batches:
        ids = torch.randint(1, vocab, (batch, prompt_tokens), device="cuda")
        timed_generate(model, ids, 8)  # warm-up: kernels, allocator, autotuning
        best = None
        for _ in range(repeats):
            prefill = timed_generate(model, ids, 1)
            full = timed_generate(model, ids, new_tokens)
            decode = (full - prefill) / (new_tokens - 1)
            best = decode if best is None else min(best, decode)
        out[batch] = best
    return out


def ours(cmd):
    """Our engine's decode tokens per second: CMD's last JSON line, its first run."""
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True)
    sys.stderr.write(done.stderr)
    line = [l for l in done.stdout.splitlines() if l.strip()][-1]
    return json.loads(line)["runs"][0]["decode_tokens_per_s"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--interleave", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    model, impl = build(a.config, a.layers)
    vocab = model.config.vocab_size
    per_round, rounds = [], []
    for r in range(a.rounds):
        theirs = measure(model, vocab, a.batch, a.prompt_tokens, a.new_tokens, a.repeats)
        per_round.append(theirs)
        if a.interleave:
            t = a.batch[0] / theirs[a.batch[0]]
            o = ours(a.interleave)
            rounds.append(
                {"round": r, "transformers_tokens_per_s": t, "ours_tokens_per_s": o, "ratio": o / t}
            )
    results = []
    for batch in a.batch:
        step = statistics.median(m[batch] for m in per_round)
        results.append(
            {"batch": batch, "decode_s_per_step": step, "decode_tokens_per_s": batch / step}
        )
    extra = {}
    if a.interleave:
        ratios = [x["ratio"] for x in rounds]
        extra = {
            "ours_command": a.interleave,
            "rounds": rounds,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    print(
        json.dumps(
            {
                "impl": "transformers",
                "transformers": __import__("transformers").__version__,
                "torch": torch.__version__,
                "experts_implementation": impl,
                "device": torch.cuda.get_device_name(),
                "layers": model.config.num_hidden_layers,
                "prompt_tokens": a.prompt_tokens,
                "new_tokens": a.new_tokens,
                "results": results,
                **extra,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
