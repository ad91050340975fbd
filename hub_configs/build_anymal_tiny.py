"""Writes `hub_configs/anymal-tiny/`: config and processor of a tiny AnyMAL with all four modalities.

    python hub_configs/build_anymal_tiny.py

The tokenizer is a byte-level BPE trained here on a short in-file corpus, so any text tokenizes and the files are
small and reproducible. Placeholders and Llama-2 specials are added tokens at the end of the vocabulary.
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import ClapFeatureExtractor, CLIPImageProcessor, PreTrainedTokenizerFast

from transformers_anymal import (
    MODALITIES,
    AnyMALConfig,
    AnyMALIMUFeatureExtractor,
    AnyMALProcessor,
    AnyMALVideoProcessor,
)


CORPUS = """\
[INST] <<SYS>> You are a helpful assistant. <</SYS>> What is in the picture? [/INST] A handwritten digit seven.
[INST] Describe the video. [/INST] The digit three moves to the left. The digit one moves up.
[INST] What does the voice say? [/INST] A voice says zero, one, two, three, four, five, six, seven, eight, nine.
[INST] What is the person doing? [/INST] The person is walking. The person is running. The person is resting.
The person is playing badminton. Is the spoken number the same as the digit in the picture? Yes. No.
Describe this image in detail. What can you hear? What happens in this clip? What activity is this?
"""
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=2048,
    )
    fast.add_special_tokens({"additional_special_tokens": [spec.token for spec in MODALITIES.values()]})
    return fast


def build_config(tokenizer: PreTrainedTokenizerFast) -> AnyMALConfig:
    return AnyMALConfig(
        text_config={
            "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 2048, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        image_config={
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
        },
        audio_config={
            "model_type": "clap_audio_model", "hidden_size": 32, "patch_embeds_hidden_size": 16, "depths": [1, 1],
            "num_attention_heads": [2, 2], "window_size": 8, "patch_size": 8, "patch_stride": [8, 8],
        },
        imu_config={"hidden_size": 32},
        **{f"{name}_token_id": tokenizer.convert_tokens_to_ids(spec.token) for name, spec in MODALITIES.items()},
        num_tokens={"image": 8, "video": 8, "audio": 4, "imu": 4},
        num_frames=4,
        resampler_depth=1,
        resampler_num_heads=2,
        resampler_head_dim=16,
    )


def build_processor(config: AnyMALConfig, tokenizer: PreTrainedTokenizerFast) -> AnyMALProcessor:
    image_size = config.image_config.image_size
    square = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    return AnyMALProcessor(
        image_processor=CLIPImageProcessor(**square),
        video_processor=AnyMALVideoProcessor(**square, num_frames=config.num_frames),
        feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"),  # one channel: the unfused CLAP
        imu_feature_extractor=AnyMALIMUFeatureExtractor(
            num_channels=config.imu_config.num_channels,
            sampling_rate=config.imu_config.sampling_rate,
            window_length=config.imu_config.window_length,
        ),
        tokenizer=tokenizer,
        num_tokens=config.num_tokens,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "anymal-tiny"))
    parser.add_argument("--vocab_size", type=int, default=384, help="BPE vocabulary before the added tokens")
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.vocab_size)
    config = build_config(tokenizer)
    build_processor(config, tokenizer).save_pretrained(args.output_dir)
    config.save_pretrained(args.output_dir)
    print(f"Wrote {args.output_dir}: vocabulary {len(tokenizer)}, modalities {config.modalities}")


if __name__ == "__main__":
    main()
