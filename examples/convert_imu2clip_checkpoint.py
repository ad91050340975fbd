"""Converts an IMU2CLIP IMU encoder checkpoint (`MW2StackRNNPooling`) into an `AnyMALIMUEncoder` directory.

    python examples/convert_imu2clip_checkpoint.py --checkpoint imu2clip.ckpt --output_dir imu-encoder

The result loads with `AutoModel.from_pretrained("imu-encoder")` (after `import transformers_anymal`) and is what
`examples/build_anymal.py --imu_encoder` takes. Lightning checkpoints (`.ckpt`, weights under `state_dict`) and
plain state dicts (`.pt`, `.safetensors`) are read; pickles only with `weights_only=True`.
"""

import argparse
import re

import torch
from safetensors.torch import load_file

from transformers_anymal import AnyMALIMUConfig, AnyMALIMUEncoder


# IMU2CLIP keeps the encoder as `net = Sequential(GroupNorm, Block, Block, Block, GroupNorm, GRU)`
KEY_MAP = [
    (r"net\.0\.", "input_norm."),
    (r"net\.([1-3])\.net\.0\.", lambda match: f"blocks.{int(match.group(1)) - 1}.conv."),
    (r"net\.4\.", "output_norm."),
    (r"net\.5\.", "gru."),
]


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps IMU2CLIP's keys (with any prefix, e.g. `imu_encoder.`) to `AnyMALIMUEncoder`'s."""
    converted = {}
    for key, tensor in state_dict.items():
        if (start := key.find("net.")) < 0:
            continue  # the text/video towers and heads of a full IMU2CLIP checkpoint
        imu_key = key[start:]
        for pattern, replacement in KEY_MAP:
            if re.match(pattern, imu_key):
                converted[re.sub(pattern, replacement, imu_key, count=1)] = tensor
                break
    if not converted:
        raise ValueError("No IMU2CLIP encoder weights (keys containing 'net.') found in the checkpoint.")
    return converted


def config_from_state_dict(state_dict: dict[str, torch.Tensor], **overrides) -> AnyMALIMUConfig:
    """Reads channel counts, kernel sizes and the embedding size off the converted weights."""
    kernel_sizes = [state_dict[f"blocks.{i}.conv.weight"].shape[-1] for i in range(3)]
    config = AnyMALIMUConfig(
        num_channels=state_dict["input_norm.weight"].shape[0],
        conv_channels=state_dict["output_norm.weight"].shape[0],
        kernel_sizes=kernel_sizes,
        hidden_size=state_dict["gru.weight_hh_l0"].shape[1],
        **overrides,
    )
    gru_input_size = state_dict["gru.weight_ih_l0"].shape[1]
    if gru_input_size != config.pooled_length:
        raise ValueError(
            f"The checkpoint's GRU reads {gru_input_size} pooled steps but window_length={config.window_length} "
            f"leaves {config.pooled_length}; pass the window length it was trained on (IMU2CLIP: 1000)."
        )
    return config


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="IMU2CLIP checkpoint: .ckpt, .pt or .safetensors")
    parser.add_argument("--output_dir", required=True, help="where to save the AnyMALIMUEncoder")
    parser.add_argument("--window_length", type=int, default=1000, help="time steps per window (5 s at 200 Hz)")
    parser.add_argument("--sampling_rate", type=int, default=200, help="sampling rate the encoder was trained on")
    args = parser.parse_args()

    state_dict = convert_state_dict(load_checkpoint(args.checkpoint))
    config = config_from_state_dict(state_dict, window_length=args.window_length, sampling_rate=args.sampling_rate)
    encoder = AnyMALIMUEncoder(config)
    encoder.load_state_dict(state_dict, strict=True)
    encoder.save_pretrained(args.output_dir)
    print(f"Saved AnyMALIMUEncoder ({sum(p.numel() for p in encoder.parameters()):,} parameters) to {args.output_dir}")


if __name__ == "__main__":
    main()
