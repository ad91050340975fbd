"""The demo's pretrained encoders, stand-ins for CLIP, CLAP and IMU2CLIP, and the settings AnyMAL is built with.

No pretrained image, audio or IMU encoder fits a 2-core machine (and none ships in a wheel), so the demo trains its
own before stage 1: each learns to tell its modality's training classes apart (digits and their place on the card,
spoken digits, activities) through a linear head that is then thrown away, as CLIP, CLAP and IMU2CLIP learn features
from labelled pairs. Each is saved as a checkpoint of its own, with its preprocessor, and `examples/build_anymal.py`
puts them together with the language model (`llm.py`) as it puts CLIP, CLAP and Llama-2 together. Everything is
frozen for good after; only projectors (stage 1) and LoRA adapters plus projectors (stage 2) train.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoProcessor,
    ClapAudioConfig,
    ClapAudioModel,
    ClapFeatureExtractor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from transformers_anymal import (
    MODALITIES,
    AnyMALConfig,
    AnyMALIMUConfig,
    AnyMALIMUEncoder,
    AnyMALIMUFeatureExtractor,
    AnyMALProcessor,
    AnyMALVideoProcessor,
)

from .data import CARD, FRAMES, IMU_SAMPLING_RATE, augment, card


TINY = Path(__file__).parents[2] / "hub_configs" / "anymal-tiny"
IMU_RATE, IMU_WINDOW = 40, 400  # BasicMotions' 10 s, resampled from 10 Hz
# LLM tokens per item: few, since every prompt token costs a pass through the 30-layer LLM in each training step
NUM_TOKENS = {"image": 4, "video": 4, "audio": 2, "imu": 2}


def media_processor(imu_mean: list[float], imu_std: list[float]) -> AnyMALProcessor:
    """The encoders' preprocessing in an AnyMALProcessor, so that encoder pretraining reads items exactly as chats
    will (its tokenizer, anymal-tiny's, only carries the placeholders). Each encoder's folder keeps its part."""
    tiny = AutoProcessor.from_pretrained(TINY)
    square = {"size": {"shortest_edge": CARD}, "crop_size": {"height": CARD, "width": CARD}}
    return AnyMALProcessor(
        image_processor=CLIPImageProcessor(**square),
        video_processor=AnyMALVideoProcessor(**square, num_frames=FRAMES),
        # CLAP's log-mel front end at 16 kHz, 2 s per clip (the spoken digits last under 1 s and are repeated)
        feature_extractor=ClapFeatureExtractor(sampling_rate=16_000, hop_length=160, fft_window_size=400,
                                               max_length_s=2, frequency_max=8_000, truncation="rand_trunc"),
        imu_feature_extractor=AnyMALIMUFeatureExtractor(sampling_rate=IMU_RATE, window_length=IMU_WINDOW,
                                                        mean=imu_mean, std=imu_std),
        tokenizer=tiny.tokenizer,
        chat_template=tiny.chat_template,
        num_tokens=NUM_TOKENS,
    )


def encoder_configs() -> dict:
    """Small encoders of the paper's kinds: a CLIP vision tower, a CLAP audio tower, IMU2CLIP's."""
    return {
        "image": CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=CARD, patch_size=4),
        "audio": ClapAudioConfig(hidden_size=64, patch_embeds_hidden_size=32, depths=[1, 1], num_attention_heads=[2, 4],
                                 window_size=8, patch_size=8, patch_stride=[8, 8], spec_size=128, num_mel_bins=64),
        "imu": AnyMALIMUConfig(hidden_size=64, conv_channels=32, sampling_rate=IMU_RATE, window_length=IMU_WINDOW),
    }


def build_encoders(seed: int) -> dict[str, nn.Module]:
    """`encoder_configs`' encoders, randomly initialised."""
    torch.manual_seed(seed)
    classes = {"image": CLIPVisionModel, "audio": ClapAudioModel, "imu": AnyMALIMUEncoder}
    return {name: classes[name](config) for name, config in encoder_configs().items()}


def save_encoders(encoders: dict[str, nn.Module], processor: AnyMALProcessor, output_dir: Path) -> dict[str, Path]:
    """Each encoder with its preprocessor in `<output_dir>/<modality>`, as build_anymal.py takes them."""
    preprocessors = {"image": processor.image_processor, "audio": processor.feature_extractor,
                     "imu": processor.imu_feature_extractor}
    folders = {}
    for name, encoder in encoders.items():
        folders[name] = output_dir / name
        encoder.save_pretrained(folders[name])
        preprocessors[name].save_pretrained(folders[name])
    return folders


def anymal_settings() -> AnyMALConfig:
    """What build_anymal.py's --config contributes: frames per clip, the resamplers' size (tokens per item go in
    its --num_tokens)."""
    return AnyMALConfig(num_frames=FRAMES, resampler_depth=2, resampler_num_heads=4,
                        resampler_head_dim=16)


def tiny_anymal_config() -> AnyMALConfig:
    """The demo's encoders and settings around anymal-tiny's small random language model, whose tokenizer
    `media_processor` has: the demo's architecture at the size of tests and benchmarks of its data pipeline."""
    tiny, settings = AutoConfig.from_pretrained(TINY), anymal_settings()
    return AnyMALConfig(
        text_config=tiny.text_config,
        **{f"{name}_config": config for name, config in encoder_configs().items()},
        **{f"{name}_token_id": getattr(tiny, f"{name}_token_id") for name in MODALITIES},
        num_tokens=NUM_TOKENS,
        **{key: getattr(settings, key) for key in ("num_frames", "resampler_depth", "resampler_num_heads",
                                                   "resampler_head_dim")},
    )


def encoder_inputs(processor, name: str, items: list, **block) -> torch.Tensor:
    """What the processor makes of `items` for `name`'s encoder (the same path chats take)."""
    chats = [[{"role": "user", "content": [{"type": name, name: item, **block}]}] for item in items]
    inputs = processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_tensors="pt")
    return inputs[MODALITIES[name].input_name]


def pretrain_encoder(encoder: nn.Module, name: str, inputs: dict[str, tuple], epochs: int, seed: int,
                     learning_rate: float = 2e-3, batch_size: int = 32) -> float:
    """Trains `name`'s encoder with throw-away linear heads on `inputs["train"] = (values, labels)`, labels being
    `(items, tasks)` class indices (one head per task); returns the first head's accuracy on `inputs["test"]` (a
    linear probe of the features the projectors will read)."""
    torch.manual_seed(seed)
    values, labels = inputs["train"]
    with torch.no_grad():
        width = pooled(encoder, name, values[:1]).shape[-1]
    heads = nn.ModuleList(nn.Linear(width, int(task.max()) + 1) for task in labels.T)
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=0.01)
    steps = epochs * -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    encoder.train()
    with tqdm(total=steps, desc=f"pretraining the {name} encoder", unit="step") as progress:
        for _ in range(epochs):
            for batch in torch.randperm(len(labels)).split(batch_size):
                features = pooled(encoder, name, values[batch])
                loss = sum(nn.functional.cross_entropy(head(features), task) for head, task in zip(heads, labels[batch].T))
                loss.backward()
                optimizer.step(), schedule.step(), optimizer.zero_grad()
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}")
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    values, labels = inputs["test"]
    with torch.no_grad():
        return (heads[0](pooled(encoder, name, values)).argmax(-1) == labels[:, 0]).float().mean().item()


def pooled(encoder: nn.Module, name: str, values: torch.Tensor) -> torch.Tensor:
    """What `name`'s projector reads, averaged over the sequence when it reads one: `(items, hidden)`."""
    outputs = encoder(values, return_dict=True)
    if MODALITIES[name].projector == "perceiver":
        return outputs.last_hidden_state.mean(1)
    return outputs.pooler_output


def pretrain_encoders(encoders: dict[str, nn.Module], processor, media: dict, seed: int) -> dict[str, float]:
    """Each encoder learns its training classes; returns each linear probe's held-out accuracy."""
    rng = np.random.default_rng(seed)

    def place():  # anywhere on the card's middle row or column, where the videos' digits go
        offset = int(rng.integers(0, CARD - 7))
        return (offset, 4) if rng.random() < 0.5 else (4, offset)

    image_inputs = {}  # the digit, and where it is: the videos' motion must stay visible in the features
    for split in ("train", "test"):
        placed = [(pixels, label, *place()) for pixels, label in media["image"][split]
                  for _ in range(3 if split == "train" else 1)]
        image_inputs[split] = (encoder_inputs(processor, "image", [card(pixels, x, y) for pixels, _, x, y in placed]),
                               torch.tensor([labels for _, *labels in placed]))
    audio_inputs = {split: (encoder_inputs(processor, "audio", [clip["array"] for clip, _ in clips],
                                           sampling_rate=clips[0][0]["sampling_rate"]),
                            torch.tensor([[label] for _, label in clips]))
                    for split, clips in media["audio"].items()}
    activities = sorted({label for _, label in media["imu"]["train"]})
    recordings = {"train": augment(media["imu"]["train"], rng, copies=16), "test": media["imu"]["test"]}
    imu_inputs = {split: (encoder_inputs(processor, "imu", [x for x, _ in items], sampling_rate=IMU_SAMPLING_RATE),
                          torch.tensor([[activities.index(label)] for _, label in items]))
                  for split, items in recordings.items()}
    return {
        "image": pretrain_encoder(encoders["image"], "image", image_inputs, epochs=14, seed=seed, batch_size=64),
        "audio": pretrain_encoder(encoders["audio"], "audio", audio_inputs, epochs=30, seed=seed),
        "imu": pretrain_encoder(encoders["imu"], "imu", imu_inputs, epochs=5, seed=seed, batch_size=16),
    }
