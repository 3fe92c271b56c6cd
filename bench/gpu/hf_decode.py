#!/usr/bin/env python3
"""Hugging Face transformers' decode speed on the shapes of a TileFlow model: the baseline that
bench/gpu/run.sh measures in the same run as ours.

The model is built from the pack's config.json with random bf16 weights straight on the GPU
(speed does not depend on the weights' values, and no checkpoint has to fit the disk), every
expert resident, `experts_implementation="grouped_mm"`, greedy generation with the KV cache.

    python3 bench/gpu/hf_decode.py --config DIR/config.json [--batch 1] [--prompt-tokens 32]
        [--new-tokens 128] [--repeats 3]

Prints one JSON line: tokens per second of the decode steps (prefill excluded, measured as
the difference between a 1-token and an N-token generation), per batch, and the device.
"""

import argparse
import json
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    model, impl = build(a.config, a.layers)
    vocab = model.config.vocab_size
    results = []
    for batch in a.batch:
        ids = torch.randint(1, vocab, (batch, a.prompt_tokens), device="cuda")
        timed_generate(model, ids, 8)  # warm-up: kernels, allocator, autotuning
        best = None
        for _ in range(a.repeats):
            prefill = timed_generate(model, ids, 1)
            full = timed_generate(model, ids, a.new_tokens)
            decode = (full - prefill) / (a.new_tokens - 1)
            best = decode if best is None else min(best, decode)
        results.append(
            {
                "batch": batch,
                "decode_s_per_step": best,
                "decode_tokens_per_s": batch / best,
            }
        )
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
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
