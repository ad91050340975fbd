"""Writes `hub_configs/anymal-{7b,13b,70b}/config.json`: the paper's AnyMAL configurations on Llama-2-chat.

    python hub_configs/build_hub_configs.py

Each component's hyperparameters are those of its published checkpoint, so `examples/build_anymal.py` can fill the
architecture with real weights: the language model is Llama-2-chat, images and video frames go through CLIP
(ViT-L/14 for 7B and 13B, OpenCLIP ViT-bigG/14 for 70B), audio through CLAP's HTSAT tower and IMU windows through
the IMU2CLIP-compatible encoder. The four placeholders are appended to Llama-2's 32,000-token vocabulary.
"""

import argparse
from pathlib import Path

from transformers_anymal import MODALITIES, AnyMALConfig


LLAMA_2_CHAT = {  # meta-llama/Llama-2-{7b,13b,70b}-chat-hf
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8},
}
CLIP_VIT_L_14 = {  # openai/clip-vit-large-patch14
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
}
CLIP_VIT_BIGG_14 = {  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k
    "model_type": "clip_vision_model", "hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 1280, "hidden_act": "gelu",
}
CLAP_HTSAT_UNFUSED = {  # laion/clap-htsat-unfused, audio tower
    "model_type": "clap_audio_model", "hidden_size": 768, "patch_embeds_hidden_size": 96, "depths": [2, 2, 6, 2],
    "num_attention_heads": [4, 8, 16, 32], "window_size": 8, "spec_size": 256, "num_mel_bins": 64,
    "enable_fusion": False,
}
VOCAB_SIZE = 32000


def build_config(size: str) -> AnyMALConfig:
    return AnyMALConfig(
        text_config={
            "model_type": "llama", **LLAMA_2_CHAT[size], "vocab_size": VOCAB_SIZE + len(MODALITIES),
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0,
        },
        image_config=CLIP_VIT_BIGG_14 if size == "70b" else CLIP_VIT_L_14,
        audio_config=CLAP_HTSAT_UNFUSED,
        imu_config={},  # IMU2CLIP's released encoder: 5 s at 200 Hz, 512-d embedding
        **{f"{name}_token_id": VOCAB_SIZE + index for index, name in enumerate(MODALITIES)},
        num_tokens={"image": 64, "video": 64, "audio": 32, "imu": 32},
        num_frames=8,
        resampler_depth=6,  # Flamingo's Perceiver Resampler: 6 layers of 8 heads of 64
        resampler_num_heads=8,
        resampler_head_dim=64,
        dtype="bfloat16",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent))
    args = parser.parse_args()
    for size in LLAMA_2_CHAT:
        path = Path(args.output_dir) / f"anymal-{size}"
        build_config(size).save_pretrained(path)
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
