"""Inference side by side: AnyMAL against LLaVA and against the bare language model, same LLM and vision tower.

    python benchmarks/bench_inference.py [--quick] [--device cuda] [--size 7b]

Time to first token, decode tokens/s and peak memory for one image, four images and a batch of eight, with the
tokens each model spends on the images. AnyMAL spends `--image_tokens` (64) per image through its Perceiver
Resampler; LLaVA spends one per patch (196 for ViT-B/16 at 224 px, 576 for ViT-L/14 at 336 px). Random weights,
realistic shapes: `--size cpu` is a ~100M-parameter Llama with ViT-B/16, `--size 1b` Llama-3.2-1B's shapes with
ViT-L/14-336 (the standard scenario; `--dtype bfloat16` on CPUs with AMX), `--size 7b` Llama-2-7B with ViT-L/14-336.
TTFT is taken in rounds that alternate AnyMAL's and LLaVA's order; each ratio is the median of the per-round ratios,
with their range.
"""

import json
import statistics
import time

import torch
from tqdm.auto import tqdm

from transformers_anymal.compatibility_anymal import CACHE_NAME

from common import (
    IMAGE_TOKEN_ID,
    build_models,
    interleaved_seconds,
    parse_args,
    peak_memory_bytes,
    print_table,
    synchronize,
)


SCENARIOS = {"1 image": (1, 1), "4 images": (1, 4), "batch of 8": (8, 1)}  # (prompts, images per prompt)


def prompt(tokens_per_image: int, prompts: int, images: int, text_tokens: int, image_size: int, device, dtype):
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 380, (prompts, text_tokens), generator=generator)
    placeholders = torch.full((prompts, tokens_per_image * images), IMAGE_TOKEN_ID)
    return {
        "input_ids": torch.cat([placeholders, text], 1).to(device),
        "attention_mask": torch.ones(prompts, placeholders.shape[1] + text_tokens, dtype=torch.long, device=device),
        "pixel_values": torch.randn(prompts * images, 3, image_size, image_size, generator=generator).to(device, dtype),
    }


def decode_seconds(model, inputs, steps: int, device: str) -> float:
    """Forward passes of one token each on the KV cache of `inputs`, timed apart from the prefill."""
    with torch.inference_mode():
        output = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, token = getattr(output, CACHE_NAME), output.logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            output = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
            cache, token = getattr(output, CACHE_NAME), output.logits[:, -1:].argmax(-1)
        synchronize(device)
        return time.perf_counter() - start


def first_token(model, inputs):
    """Time to first token: `generate` of one token (encoders, projectors, prefill)."""
    def run():
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return run


def measure(model, inputs, ttft: list[float], decode_steps: int, device: str, repeats: int) -> dict:
    """The TTFT rounds' median and spread, decode tokens/s on the prompt's KV cache, and peak memory."""
    decode_s = statistics.median(decode_seconds(model, inputs, decode_steps, device) for _ in range(repeats))
    return {"prompt_tokens": inputs["input_ids"].shape[1], "ttft_s": statistics.median(ttft),
            "ttft_min_s": min(ttft), "ttft_max_s": max(ttft),
            "decode_tokens_per_s": inputs["input_ids"].shape[0] * decode_steps / decode_s,
            "peak_memory_mb": peak_memory_bytes(first_token(model, inputs), device) / 2**20}


def decode_ratio(anymal, bare, inputs, text_only, steps: int, device: str) -> float:
    """AnyMAL's decode speed over the bare LLM's on the same token sequence: both prefill their prompt, then take
    `steps` one-token steps each, in alternation (which goes first alternating too); the ratio of the median step
    times. Steps in alternation, rather than a block of steps of each, keep the machine's drift and whatever ran
    before a block (AnyMAL's prefill runs the vision tower) out of the ratio."""
    models, prompts = {"bare": bare, "anymal": anymal}, {"bare": text_only, "anymal": inputs}
    caches, tokens, seconds = {}, {}, {"bare": [], "anymal": []}
    with torch.inference_mode():
        for name, model in models.items():
            output = model(**prompts[name], use_cache=True, logits_to_keep=1)
            caches[name], tokens[name] = getattr(output, CACHE_NAME), output.logits[:, -1:].argmax(-1)
        for step in range(steps):
            for name in ("bare", "anymal")[:: 1 if step % 2 == 0 else -1]:
                synchronize(device)
                start = time.perf_counter()
                output = models[name](input_ids=tokens[name], use_cache=True, **{CACHE_NAME: caches[name]})
                caches[name], tokens[name] = getattr(output, CACHE_NAME), output.logits[:, -1:].argmax(-1)
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
    return statistics.median(seconds["bare"]) / statistics.median(seconds["anymal"])


def main(argv=None) -> dict:
    args = parse_args(__doc__, "inference.json", argv, image_tokens=(int, 64, "AnyMAL tokens per image"),
                      text_tokens=(int, 32, "text tokens in every prompt"))
    device, dtype, size = args.device, args.dtype, args.size
    repeats, decode_steps = (3, 16) if args.quick else (5, 64)
    anymal, llava, bare = build_models(size, device, dtype, args.image_tokens)
    image_size, patch = anymal.config.image_config.image_size, anymal.config.image_config.patch_size
    llava_tokens = (image_size // patch) ** 2

    results, rows, ratios = {}, [], {}
    for scenario, (prompts, images) in tqdm(SCENARIOS.items(), desc="scenarios", unit="scenario"):
        contenders = {"AnyMAL": (anymal, args.image_tokens), "LLaVA": (llava, llava_tokens)}
        inputs = {name: prompt(tokens, prompts, images, args.text_tokens, image_size, device, dtype)
                  for name, (_, tokens) in contenders.items()}
        ttft = interleaved_seconds({name: first_token(model, inputs[name]) for name, (model, _) in contenders.items()},
                                   device, repeats)
        per_round = [mine / theirs for mine, theirs in zip(ttft["AnyMAL"], ttft["LLaVA"])]
        ratios[scenario] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
        for name, (model, tokens) in contenders.items():
            result = results.setdefault(scenario, {})[name] = measure(model, inputs[name], ttft[name], decode_steps,
                                                                         device, repeats)
            rows.append([scenario, name, tokens * images, result["prompt_tokens"],
                         f"{1000 * result['ttft_s']:.0f} ({1000 * result['ttft_min_s']:.0f}-"
                         f"{1000 * result['ttft_max_s']:.0f})",
                         f"{result['decode_tokens_per_s']:.1f}", f"{result['peak_memory_mb']:.0f}"])
    anymal_prompt = prompt(args.image_tokens, 1, 1, args.text_tokens, image_size, device, dtype)
    text_only = {"input_ids": anymal_prompt["input_ids"] % 380, "attention_mask": anymal_prompt["attention_mask"]}
    bare_ttft = interleaved_seconds({"bare LLM": first_token(bare, text_only)}, device, repeats)["bare LLM"]
    results["bare LLM"] = bare_row = measure(bare, text_only, bare_ttft, decode_steps, device, repeats)
    rows.append(["same tokens", "bare LLM", 0, bare_row["prompt_tokens"], f"{1000 * bare_row['ttft_s']:.0f}",
                 f"{bare_row['decode_tokens_per_s']:.1f}", f"{bare_row['peak_memory_mb']:.0f}"])
    print_table(f"Inference ({size} shapes, {device}, {str(dtype).removeprefix('torch.')}, {args.threads} threads; "
                f"TTFT median (range) of {repeats} interleaved rounds; decode over {decode_steps} tokens)",
                ["scenario", "model", "image tokens", "prompt tokens", "TTFT ms", "decode tok/s", "peak MB"], rows)

    headline = {
        "ttft_ratio_vs_llava": ratios["1 image"]["median"],
        "ttft_ratio_vs_llava_4_images": ratios["4 images"]["median"],
        "ttft_ratio_vs_llava_batch_8": ratios["batch of 8"]["median"],
        "decode_ratio_vs_bare_llm": decode_ratio(anymal, bare, anymal_prompt, text_only,
                                                 steps=80 if args.quick else 400, device=device),
    }
    print_table("Ratios, AnyMAL over LLaVA per interleaved round (median, range), and decode over the bare LLM",
                ["ratio", "value"],
                [[f"TTFT, {scenario}", f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"]
                 for scenario, ratio in ratios.items()]
                + [["decode vs bare LLM", f"{headline['decode_ratio_vs_bare_llm']:.3f}"]])
    output = {"device": device, "size": size, "dtype": str(dtype), "threads": args.threads, "repeats": repeats,
              "results": results, "ttft_ratio_rounds": ratios, **headline}
    with open(args.output, "w") as file:
        json.dump(output, file, indent=2)
    return output


if __name__ == "__main__":
    main()
