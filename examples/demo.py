"""Runs AnyMAL end to end on one prompt that interleaves an image, a video, audio and IMU readings.

    python examples/demo.py                                   # the tiny random model of hub_configs/anymal-tiny
    python examples/demo.py --model_name_or_path path/to/anymal-checkpoint --max_new_tokens 64

With the default, the weights are random, so the answer is noise: the demo shows the plumbing (processor, encoders,
projectors, generation) and what each modality costs in LLM tokens. The media are made on the fly.
"""

import argparse
import time

import numpy as np
from PIL import Image, ImageDraw


def make_media(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).text((24, 20), "7", fill="black")
    frames = np.zeros((16, 64, 64, 3), dtype=np.uint8)  # a white square moving left to right
    for index, frame in enumerate(frames):
        frame[24:40, 4 * index : 4 * index + 16] = 255
    seconds = np.arange(48_000) / 16_000  # 3 s of a 440 Hz tone at 16 kHz
    audio = (0.3 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32)
    steps = np.arange(500) / 100  # 5 s of walking-like motion at 100 Hz
    imu = np.stack([np.sin(2 * np.pi * 2 * steps + phase) for phase in range(6)]) + 0.05 * rng.standard_normal((6, 500))
    return {"image": image, "video": frames, "audio": audio, "imu": imu}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="hub_configs/anymal-tiny",
                        help="an AnyMAL checkpoint; a config-only directory gives random weights")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch  # after parsing, so that --help answers at once
    from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor

    import transformers_anymal  # registers AnyMAL with the Auto classes

    torch.manual_seed(args.seed)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    try:
        model = AutoModelForMultimodalLM.from_pretrained(args.model_name_or_path)
    except OSError:  # no weights: build the architecture with random ones
        model = AutoModelForMultimodalLM.from_config(AutoConfig.from_pretrained(args.model_name_or_path))
        print(f"{args.model_name_or_path} has no weights: using random ones, so the answer is noise.")
    model.eval()

    media = make_media(args.seed)
    messages = [
        {"role": "system", "content": "You describe what the sensors and media show."},
        {"role": "user", "content": [
            {"type": "image", "image": media["image"]},
            {"type": "video", "video": media["video"]},
            {"type": "audio", "audio": media["audio"], "sampling_rate": 16_000},
            {"type": "imu", "imu": media["imu"], "sampling_rate": 100},
            {"type": "text", "text": "What is the person doing, and what digit is shown?"},
        ]},
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start

    prompt_length = inputs["input_ids"].shape[1]
    print(f"{'modality':<9} {'input':<28} tokens in prompt")
    for name in model.config.modalities:
        key = transformers_anymal.MODALITIES[name].input_name
        count = int((inputs["input_ids"] == getattr(model.config, f"{name}_token_id")).sum())
        print(f"{name:<9} {str(tuple(inputs[key].shape)):<28} {count}")
    print(f"prompt: {prompt_length} tokens; generated {generated.shape[1] - prompt_length} tokens in {seconds:.2f} s")
    print("answer:", processor.decode(generated[0, prompt_length:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
