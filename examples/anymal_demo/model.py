"""The demo's tiny AnyMAL and the pretraining that stands in for the paper's pretrained parts.

The paper starts from a pretrained LLM (Llama-2-chat) and pretrained encoders (CLIP, CLAP, IMU2CLIP). At toy scale
nothing pretrained fits on a 2-core machine, so the demo makes its own before stage 1:
- the language model is trained on the text of the training chats (questions and answers, media left out), so it
  knows the words and the format but not what any particular item shows;
- each encoder is trained to tell its modality's training classes apart (digits, spoken digits, activities) through a
  linear head that is then thrown away, as CLIP/CLAP/IMU2CLIP learn features from labelled pairs.
Both are then frozen for good; only projectors (stage 1) and LoRA adapters plus projectors (stage 2) train after.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoProcessor,
    ClapFeatureExtractor,
    CLIPImageProcessor,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from transformers_anymal import (
    MODALITIES,
    AnyMALConfig,
    AnyMALForConditionalGeneration,
    AnyMALIMUFeatureExtractor,
    AnyMALProcessor,
    AnyMALVideoProcessor,
)

from .data import CARD, FRAMES, IMU_SAMPLING_RATE, augment, card


TOKENIZER = Path(__file__).parents[2] / "hub_configs" / "anymal-tiny"  # its BPE vocabulary covers the demo's words
IMU_RATE, IMU_WINDOW = 40, 400  # BasicMotions' 10 s, resampled from 10 Hz


def build_processor(imu_mean: list[float], imu_std: list[float]) -> AnyMALProcessor:
    tiny = AutoProcessor.from_pretrained(TOKENIZER)
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
        num_tokens={"image": 8, "video": 8, "audio": 4, "imu": 4},
    )


def build_config(processor: AnyMALProcessor) -> AnyMALConfig:
    tokenizer = processor.tokenizer
    return AnyMALConfig(
        text_config={
            "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 256, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        image_config={
            "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": CARD, "patch_size": 4,
        },
        audio_config={
            "model_type": "clap_audio_model", "hidden_size": 64, "patch_embeds_hidden_size": 32, "depths": [1, 1],
            "num_attention_heads": [2, 4], "window_size": 8, "patch_size": 8, "patch_stride": [8, 8],
            "spec_size": 128, "num_mel_bins": 64,
        },
        imu_config={"hidden_size": 64, "conv_channels": 32, "sampling_rate": IMU_RATE, "window_length": IMU_WINDOW},
        **{f"{name}_token_id": tokenizer.convert_tokens_to_ids(spec.token) for name, spec in MODALITIES.items()},
        num_tokens=processor.num_tokens,
        num_frames=FRAMES,
        resampler_depth=2,
        resampler_num_heads=4,
        resampler_head_dim=16,
    )


def pretrain_language_model(model: AnyMALForConditionalGeneration, processor, texts: list[str], output_dir: str,
                            epochs: int, seed: int):
    """Next-token training of the language model alone on plain text, with transformers' Trainer."""
    model.set_trainable(language_model=True, encoders=False, projectors=False)
    tokenized = [processor.tokenizer(text) for text in texts]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=output_dir, num_train_epochs=epochs, per_device_train_batch_size=32,
                               learning_rate=3e-3, warmup_steps=20, lr_scheduler_type="cosine", logging_steps=25,
                               save_strategy="no", report_to="none", seed=seed, use_cpu=not torch.cuda.is_available()),
        train_dataset=tokenized,
        data_collator=DataCollatorForLanguageModeling(processor.tokenizer, mlm=False),
    )
    trainer.train()


def encoder_inputs(processor, name: str, items: list, **block) -> torch.Tensor:
    """What the processor makes of `items` for `name`'s encoder (the same path chats take)."""
    chats = [[{"role": "user", "content": [{"type": name, name: item, **block}]}] for item in items]
    inputs = processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_tensors="pt")
    return inputs[MODALITIES[name].input_name]


def pretrain_encoder(model: AnyMALForConditionalGeneration, name: str, inputs: dict[str, tuple], epochs: int,
                     seed: int, learning_rate: float = 2e-3, batch_size: int = 32) -> float:
    """Trains `name`'s encoder with throw-away linear heads on `inputs["train"] = (values, labels)`, labels being
    `(items, tasks)` class indices (one head per task); returns the first head's accuracy on `inputs["test"]` (a
    linear probe of the features the projectors will read)."""
    torch.manual_seed(seed)
    encoder = model.model.modality_encoder(name)
    values, labels = inputs["train"]
    with torch.no_grad():
        width = pooled(model, name, values[:1]).shape[-1]
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
                features = pooled(model, name, values[batch])
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
        return (heads[0](pooled(model, name, values)).argmax(-1) == labels[:, 0]).float().mean().item()


def pooled(model, name: str, values: torch.Tensor) -> torch.Tensor:
    """The encoder's output averaged over everything but items and channels."""
    features = model.model.get_encoder_features(name, values)
    return features.mean(dim=tuple(range(1, features.ndim - 1))) if features.ndim > 2 else features


def pretrain_encoders(model, processor, media: dict, seed: int) -> dict[str, float]:
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
        "image": pretrain_encoder(model, "image", image_inputs, epochs=14, seed=seed, batch_size=64),
        "audio": pretrain_encoder(model, "audio", audio_inputs, epochs=30, seed=seed),
        "imu": pretrain_encoder(model, "imu", imu_inputs, epochs=5, seed=seed, batch_size=16),
    }
