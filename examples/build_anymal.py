"""Assembles a starting AnyMAL checkpoint from pretrained parts: an LLM plus any subset of modality encoders.

    python examples/build_anymal.py --llm meta-llama/Llama-2-70b-chat-hf \\
        --image_encoder laion/CLIP-ViT-bigG-14-laion2B-39B-b160k --audio_encoder laion/clap-htsat-unfused \\
        --imu_encoder path/to/converted-imu2clip --config hub_configs/anymal-70b --output_dir anymal-70b-init

Each component keeps its pretrained weights; the projectors are new (train them with examples/align.py). The
placeholder tokens are added to the LLM's tokenizer and its embeddings resized, and the components' preprocessors
are combined into an AnyMALProcessor, with a chat template in the LLM's own format (Llama-2-chat or ChatML) that also
renders media blocks. `--config` takes tokens per item and resampler settings from an AnyMAL config.
"""

import argparse
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    ClapFeatureExtractor,
    CLIPImageProcessor,
    set_seed,
)

from transformers_anymal import (
    MODALITIES,
    AnyMALConfig,
    AnyMALForConditionalGeneration,
    AnyMALIMUEncoder,
    AnyMALIMUFeatureExtractor,
    AnyMALProcessor,
    AnyMALVideoProcessor,
)
from transformers_anymal.modeling_anymal import build_projector, encoder_class
from transformers_anymal.processing_anymal import chatml_chat_template, llama2_chat_template


SETTINGS = ("num_tokens", "num_frames", "resampler_depth", "resampler_num_heads", "resampler_head_dim")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", required=True, help="causal LM checkpoint (Hub id or path), e.g. Llama-2-chat")
    parser.add_argument("--image_encoder", help="CLIP checkpoint; its vision tower encodes images (and video frames)")
    parser.add_argument("--video_encoder", help="a separate vision checkpoint for video frames (default: the image one)")
    parser.add_argument("--no_video", action="store_true", help="do not add video, even with an image encoder")
    parser.add_argument("--audio_encoder", help="CLAP checkpoint; its audio tower encodes audio")
    parser.add_argument("--imu_encoder", help="AnyMALIMUEncoder directory (examples/convert_imu2clip_checkpoint.py)")
    parser.add_argument("--config", help="AnyMAL config to take num_tokens, num_frames and resampler settings from")
    parser.add_argument("--num_tokens", type=_num_tokens, default={},
                        help="LLM tokens per item by modality, e.g. image=4,video=4,audio=2 (over --config's)")
    parser.add_argument("--chat_template", default="auto",
                        help="auto (the LLM's format: ChatML if its template uses <|im_start|>, else Llama-2-chat), "
                             "llama2, chatml, or a .jinja file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0, help="for the new projectors and placeholder embeddings")
    parser.add_argument("--output_dir", required=True, help="where to save the model and processor")
    parser.add_argument("--push_to_hub", action="store_true", help="also push model and processor to the Hub")
    parser.add_argument("--hub_model_id", help="repo for --push_to_hub (default: the output_dir name)")
    return parser.parse_args(argv)


def _num_tokens(text: str) -> dict[str, int]:
    """`image=4,audio=2` -> {"image": 4, "audio": 2}"""
    try:
        pairs = dict(item.split("=") for item in text.split(","))
        counts = {name.strip(): int(count) for name, count in pairs.items()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give modality=count pairs, e.g. image=4,audio=2") from None
    if unknown := set(counts) - set(MODALITIES):
        raise argparse.ArgumentTypeError(f"unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}")
    if any(count < 1 for count in counts.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 1")
    return counts


def load_encoder(path: str, tower: str, dtype):
    """The `tower` ("vision" or "audio") of a dual encoder such as CLIP or CLAP, or the checkpoint itself."""
    config = AutoConfig.from_pretrained(path)
    tower_config = getattr(config, f"{tower}_config", None)
    if tower_config is None:
        return encoder_class(config).from_pretrained(path, dtype=dtype)
    tower_class = encoder_class(tower_config)
    with torch.device("meta"):  # where does the dual encoder keep that tower, if as a whole model?
        skeleton = AutoModel.from_config(config)
    inside = next((name for name, module in skeleton.named_modules() if isinstance(module, tower_class)), None)
    if inside is not None:  # CLAP: `audio_model` is a ClapAudioModel
        return AutoModel.from_pretrained(path, dtype=dtype).get_submodule(inside)
    encoder, info = tower_class.from_pretrained(path, config=tower_config, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:  # CLIP: CLIPVisionModel reads the `vision_model.*` weights of a CLIPModel
        raise ValueError(f"{path} has no weights for {len(info['missing_keys'])} parameters of its {tower} tower, "
                         f"e.g. {sorted(info['missing_keys'])[:3]}; pass a checkpoint of the {tower} encoder itself.")
    return encoder


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    encoders = {}
    if args.image_encoder:
        encoders["image"] = load_encoder(args.image_encoder, "vision", dtype)
    if args.video_encoder:
        encoders["video"] = load_encoder(args.video_encoder, "vision", dtype)
    if args.audio_encoder:
        encoders["audio"] = load_encoder(args.audio_encoder, "audio", dtype)
    if args.imu_encoder:
        encoders["imu"] = AnyMALIMUEncoder.from_pretrained(args.imu_encoder, dtype=dtype)
    modalities = [name for name in MODALITIES if name in encoders
                  or (name == "video" and "image" in encoders and not args.no_video)]
    if not modalities:
        raise SystemExit("Give at least one of --image_encoder, --audio_encoder, --imu_encoder.")

    if extra := set(args.num_tokens) - set(modalities):
        raise SystemExit(f"--num_tokens names {sorted(extra)}, which this model does not take ({modalities}).")

    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    tokenizer.add_special_tokens({"additional_special_tokens": [MODALITIES[name].token for name in modalities]})
    if tokenizer.pad_token is None:  # Llama-2 has none; batched generation pads on the left
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    llm = AutoModelForCausalLM.from_pretrained(args.llm, dtype=dtype)
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    settings = AutoConfig.from_pretrained(args.config) if args.config else AnyMALConfig()
    config = AnyMALConfig(
        text_config=llm.config,
        **{f"{name}_config": encoder.config for name, encoder in encoders.items()},
        **{f"{name}_token_id": tokenizer.convert_tokens_to_ids(MODALITIES[name].token) for name in modalities},
        **{key: getattr(settings, key) for key in SETTINGS if key != "num_tokens"},
        num_tokens={name: args.num_tokens.get(name, settings.num_tokens.get(name, MODALITIES[name].num_tokens))
                    for name in modalities},
        dtype=args.dtype,
    )

    with torch.device("meta"):  # only the projectors are new; every other part comes in with its weights
        model = AnyMALForConditionalGeneration(config)
    model.model.language_model, model.lm_head = llm.get_decoder(), llm.get_output_embeddings()
    for name, encoder in encoders.items():
        model.model.encoders[name] = encoder
    for name in modalities:
        model.model.projectors[name] = build_projector(config, name).to(dtype)
        for module in model.model.projectors[name].modules():
            model._init_weights(module)
    model.eval()

    processor = AnyMALProcessor(
        image_processor=_preprocessor(AutoImageProcessor, args.image_encoder, CLIPImageProcessor),
        video_processor=_video_processor(args.video_encoder or args.image_encoder, config),
        feature_extractor=_audio_feature_extractor(args.audio_encoder, config),
        imu_feature_extractor=_imu_feature_extractor(args.imu_encoder, config),
        tokenizer=tokenizer,
        chat_template=_chat_template(args.chat_template, tokenizer, modalities),
        num_tokens=config.num_tokens,
    )
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    parameters = {name: sum(p.numel() for p in module.parameters()) for name, module in model.model.projectors.items()}
    print(f"Saved AnyMAL ({', '.join(modalities)}) to {args.output_dir}; new projector parameters: {parameters}")
    if args.push_to_hub:
        repo_id = args.hub_model_id or args.output_dir.rstrip("/").split("/")[-1]
        model.push_to_hub(repo_id)
        processor.push_to_hub(repo_id)
        print(f"Pushed to {repo_id}")


def _preprocessor(auto_class, path, default_class):
    if path is None:
        return default_class()
    try:
        return auto_class.from_pretrained(path)
    except OSError:  # the checkpoint ships no preprocessor config
        return default_class()


def _video_processor(path, config: AnyMALConfig) -> AnyMALVideoProcessor:
    """Frames are preprocessed like the frame encoder's images."""
    image_processor = _preprocessor(AutoImageProcessor, path, CLIPImageProcessor)
    keys = ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop")
    return AnyMALVideoProcessor(**{key: getattr(image_processor, key) for key in keys if hasattr(image_processor, key)},
                                num_frames=config.num_frames)


def _audio_feature_extractor(path, config: AnyMALConfig) -> ClapFeatureExtractor:
    extractor = _preprocessor(AutoFeatureExtractor, path, ClapFeatureExtractor)
    if config.audio_config is not None and not getattr(config.audio_config, "enable_fusion", False):
        extractor.truncation = "rand_trunc"  # an unfused CLAP takes one 10 s crop, not four fused views
    return extractor


def _imu_feature_extractor(path, config: AnyMALConfig) -> AnyMALIMUFeatureExtractor:
    """The IMU encoder's own feature extractor when its folder has one (e.g. with normalisation statistics), else
    one that fits the encoder's config."""
    if path is not None and (Path(path) / "preprocessor_config.json").exists():
        return AnyMALIMUFeatureExtractor.from_pretrained(path)
    if config.imu_config is None:
        return AnyMALIMUFeatureExtractor()
    return AnyMALIMUFeatureExtractor(num_channels=config.imu_config.num_channels,
                                     sampling_rate=config.imu_config.sampling_rate,
                                     window_length=config.imu_config.window_length)


def _chat_template(choice: str, tokenizer, modalities: list[str]) -> str:
    """The processor's template: media blocks of `modalities` rendered as placeholders, the rest in the LLM's format."""
    if choice == "auto":
        choice = "chatml" if "<|im_start|>" in (tokenizer.chat_template or "") else "llama2"
    if choice in ("llama2", "chatml"):
        return (llama2_chat_template if choice == "llama2" else chatml_chat_template)(modalities)
    return Path(choice).read_text()


if __name__ == "__main__":
    main()
