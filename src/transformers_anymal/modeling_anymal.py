"""AnyMAL: pretrained modality encoders whose outputs projectors turn into token embeddings of a pretrained LLM."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoModel,
    ClapAudioModel,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, logging

from .compatibility_anymal import (
    CACHE_NAME,
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    resolve_cache_argument,
)
from .configuration_anymal import MODALITIES, AnyMALConfig, AnyMALIMUConfig
from .freezing_anymal import AnyMALFreezingMixin
from .publishing_anymal import AnyMALPublishingMixin
from .quantization_anymal import AnyMALQuantizationMixin


logger = logging.get_logger(__name__)



# Built on transformers' own output classes (see compatibility_anymal), so their fields and names follow the
# installed release: the cache is `cache` from 5.24 on (`past_key_values` before), and 5.24 adds `image_outputs`,
# `video_outputs` and `audio_outputs`. AnyMAL adds the projected tokens of every modality, IMU included.
@auto_docstring(custom_intro="Outputs of [`AnyMALModel`].")
@dataclass
class AnyMALModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    modality_hidden_states (`dict[str, torch.Tensor]`, *optional*):
        Projected tokens of each modality in the batch, `(num_items, num_tokens, hidden_size)` per modality.
    """

    modality_hidden_states: dict[str, torch.Tensor] | None = None


@auto_docstring(custom_intro="Outputs of [`AnyMALForConditionalGeneration`].")
@dataclass
class AnyMALCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    modality_hidden_states (`dict[str, torch.Tensor]`, *optional*):
        Projected tokens of each modality in the batch, `(num_items, num_tokens, hidden_size)` per modality.
    """

    modality_hidden_states: dict[str, torch.Tensor] | None = None


# what the installed release's outputs hold per modality, e.g. `image_outputs` (5.24 on; 5.23 has none)
ENCODER_OUTPUT_FIELDS = {field for field in AnyMALModelOutputWithPast.__dataclass_fields__ if field.endswith("_outputs")}


class AnyMALIMUBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, pool_size: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, bias=False)
        self.pool = nn.MaxPool1d(pool_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(hidden_states))


@auto_docstring(custom_intro="IMU encoder with the architecture of IMU2CLIP's `MW2StackRNNPooling`.")
class AnyMALIMUEncoder(PreTrainedModel):
    config: AnyMALIMUConfig
    main_input_name = "imu_values"
    input_modalities = ("time",)
    _no_split_modules = ["AnyMALIMUEncoder"]
    # it has no attention layers, so every attention backend a composite model asks for applies to it as it is
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, config: AnyMALIMUConfig):
        super().__init__(config)
        channels = [config.num_channels] + [config.conv_channels] * len(config.kernel_sizes)
        self.input_norm = nn.GroupNorm(2, config.num_channels)
        self.blocks = nn.ModuleList(
            AnyMALIMUBlock(channels[i], channels[i + 1], kernel_size, config.dilation, config.pool_size)
            for i, kernel_size in enumerate(config.kernel_sizes)
        )
        self.output_norm = nn.GroupNorm(4, config.conv_channels)
        self.gru = nn.GRU(config.pooled_length, config.hidden_size, batch_first=True)
        self.post_init()

    @auto_docstring
    def forward(self, imu_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        imu_values (`torch.Tensor` of shape `(batch_size, num_channels, window_length)`):
            Normalised accelerometer and gyroscope readings.
        """
        hidden_states = self.input_norm(imu_values)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.output_norm(hidden_states)  # (batch, conv_channels, pooled_length)
        # IMU2CLIP's GRU steps over the conv channels, reading the pooled time steps as features
        sequence, last_state = self.gru(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=last_state[0])

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.GRU):  # PyTorch's own GRU initialisation
            bound = module.hidden_size**-0.5
            for parameter in module.parameters():
                init.uniform_(parameter, -bound, bound)


class AnyMALPerceiverLayer(nn.Module):
    """Latents cross-attend to the media and to themselves (Flamingo), then go through an MLP."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.media_norm = nn.LayerNorm(hidden_size)
        self.latents_norm = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.mlp = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, mlp_ratio * hidden_size, bias=False),
            nn.GELU(),
            nn.Linear(mlp_ratio * hidden_size, hidden_size, bias=False),
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents_normed = self.latents_norm(latents)
        context = torch.cat([self.media_norm(media), latents_normed], dim=1)  # (items, seq + latents, hidden)
        query, key, value = (
            proj(states).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            for proj, states in ((self.q_proj, latents_normed), (self.k_proj, context), (self.v_proj, context))
        )
        attended = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2)
        latents = latents + self.o_proj(attended)
        return latents + self.mlp(latents)


class AnyMALPerceiverResampler(nn.Module):
    """Turns a variable number of encoder features into `num_latents` LLM tokens (Flamingo's Perceiver Resampler).

    Works in the encoder's width and projects once at the end, so the LLM's width does not scale its cost.
    """

    def __init__(self, config: AnyMALConfig, input_size: int, num_latents: int, num_frames: int | None = None):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(num_latents, input_size))
        # learned temporal embedding, added to every patch of a frame (video)
        self.frame_embeddings = nn.Parameter(torch.empty(num_frames, 1, input_size)) if num_frames else None
        self.layers = nn.ModuleList(
            AnyMALPerceiverLayer(input_size, config.resampler_num_heads, config.resampler_head_dim)
            for _ in range(config.resampler_depth)
        )
        self.norm = nn.LayerNorm(input_size)
        self.proj = nn.Linear(input_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.latents.dtype)  # encoders may run in another precision than the projector
        if self.frame_embeddings is not None:  # (items, frames, patches, hidden) -> (items, frames * patches, hidden)
            features = (features + self.frame_embeddings[: features.shape[1]]).flatten(1, 2)
        latents = self.latents.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(features, latents)
        return self.proj(self.norm(latents))  # (items, num_latents, text_hidden)


class AnyMALLinearProjector(nn.Module):
    """Maps one pooled embedding per item to `num_tokens` LLM tokens."""

    def __init__(self, config: AnyMALConfig, input_size: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(input_size, num_tokens * config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.proj.weight.dtype)
        return self.proj(features).unflatten(-1, (self.num_tokens, -1))  # (items, num_tokens, text_hidden)


_ENCODERS_OUTSIDE_AUTOMODEL = {"clap_audio_model": ClapAudioModel, "anymal_imu": AnyMALIMUEncoder}


def encoder_class(config) -> type[PreTrainedModel]:
    """The class of the encoder a sub-config describes; `AutoModel` knows all but CLAP's audio tower and ours."""
    return _ENCODERS_OUTSIDE_AUTOMODEL.get(config.model_type) or MODEL_MAPPING[type(config)]


def build_encoder(config) -> PreTrainedModel:
    if config.model_type in _ENCODERS_OUTSIDE_AUTOMODEL:
        return encoder_class(config)(config)
    return AutoModel.from_config(config)


class AnyMALEncoders(nn.ModuleDict):
    """The modality encoders by modality name. Declares what its encoders declare (modules never split across
    devices, modules kept in fp32, tied weights, keys ignored on load and save), under the attribute names
    `PreTrainedModel.post_init` gathers from a model's direct children, so AnyMAL's carry them as LLaVA's carry its
    vision tower's."""

    def __init__(self, encoders: dict[str, PreTrainedModel]):
        super().__init__(encoders)
        for attribute in ("_no_split_modules", "_keep_in_fp32_modules", "_keep_in_fp32_modules_strict",
                          "_skip_keys_device_placement", "_keys_to_ignore_on_load_unexpected",
                          "_keys_to_ignore_on_load_missing"):
            setattr(self, attribute, set().union(*(getattr(encoder, attribute, None) or () for encoder in encoders.values())))
        self._keys_to_ignore_on_save = {  # matched exactly, so with the encoder's name, as post_init adds the children's
            f"{name}.{key}" for name, encoder in encoders.items() for key in encoder._keys_to_ignore_on_save or ()
        }
        self.all_tied_weights_keys = {
            f"{name}.{target}": f"{name}.{source}"
            for name, encoder in encoders.items() for target, source in (encoder.all_tied_weights_keys or {}).items()
        }


def _attention_flag(implementation: str) -> str | None:
    """The class attribute by which a transformers model declares that it supports an attention backend."""
    if implementation in (None, "eager", "paged|eager"):
        return None
    if "flash" in implementation:
        return "_supports_flash_attn"
    if implementation.endswith("sdpa"):
        return "_supports_sdpa"
    if implementation.endswith("flex_attention"):
        return "_supports_flex_attn"
    return "_supports_attention_backend"  # a function registered in transformers' AttentionInterface


def attention_per_sub_model(config: AnyMALConfig, requested: str | None = None) -> dict[str, str]:
    """The attention backend of each sub-model, in the `{sub_config: implementation}` form of transformers'
    `attn_implementation`: `requested` (by default, what each sub-config asks for) where the sub-model supports it,
    "eager" where it does not (CLAP's audio tower has neither SDPA, flash nor flex attention). Says once which fell
    back; sub-configs that ask for nothing are left to transformers' own default."""
    implementations, fell_back = {}, []
    for key in config.sub_configs:
        if (sub_config := getattr(config, key, None)) is None or (wanted := requested or sub_config._attn_implementation) is None:
            continue
        model_class = MODEL_MAPPING[type(sub_config)] if key == "text_config" else encoder_class(sub_config)
        supported = (flag := _attention_flag(wanted)) is None or getattr(model_class, flag, False)
        implementations[key] = wanted if supported else "eager"
        if not supported:
            fell_back.append(f"{key} ({model_class.__name__}) does not support {wanted!r}")
    if fell_back:
        logger.warning_once(f"{'; '.join(fell_back)}: these use 'eager' attention, the other sub-models what was asked for.")
    return implementations


def build_projector(config: AnyMALConfig, name: str) -> nn.Module:
    spec, input_size = config.modality_specs[name], config.get_encoder_config(name).hidden_size
    if spec.projector == "perceiver":
        num_frames = config.num_frames if spec.has_frames else None
        return AnyMALPerceiverResampler(config, input_size, config.num_tokens[name], num_frames)
    return AnyMALLinearProjector(config, input_size, config.num_tokens[name])


# the arguments of both `forward`s that transformers does not document itself
FORWARD_ARGUMENTS = r"""
    pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, num_frames, channels, height, width)`):
        Frames of each video clip.
    input_features (`torch.FloatTensor` of shape `(num_audios, channels, time, num_mel_bins)`):
        Log-mel features of each audio clip, as CLAP's feature extractor gives them.
    imu_values (`torch.FloatTensor` of shape `(num_recordings, num_channels, window_length)`):
        Normalised IMU windows.
    cache (`Cache`, *optional*):
        The language model's key/value cache (the name transformers >= 5.24 passes it under).
    encoder_features (`dict[str, torch.Tensor]`, *optional*):
        Per modality, outputs of the frozen encoder computed earlier with [`~AnyMALModel.get_encoder_features`]; the encoder
        is skipped and only the projector runs (feature caching for alignment training).
    mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
        Per modality, what [`~AnyMALModel.get_modality_features`] returns: the projector's tokens, after the encoder
        and the projector, in `pooler_output`, `(num_items, num_tokens, hidden_size)` (transformers' name for media
        encoded beforehand; `encoder_features` are one step earlier, before the projector).
    prompt_embeds (`torch.FloatTensor` of shape `(batch_size, prompt_length, hidden_size)`, *optional*):
        Embeddings of the first `prompt_length` positions with every item's tokens in place of its placeholders;
        `generate` computes them once, before prefill, so media are never encoded again while decoding.
    past_key_values (`Cache`, *optional*):
        The same cache as `cache`, under the name transformers 5.23 passes it; give one of the two.
"""


@auto_docstring
class AnyMALPreTrainedModel(AnyMALFreezingMixin, AnyMALQuantizationMixin, AnyMALPublishingMixin, PreTrainedModel):
    config: AnyMALConfig
    base_model_prefix = "model"
    input_modalities = ("text", *dict.fromkeys(spec.input_modality for spec in MODALITIES.values()))
    supports_gradient_checkpointing = True
    # with the encoders' and the language model's own (gathered in AnyMALModel); CLAP's audio tower declares none
    _no_split_modules = ["AnyMALPerceiverLayer", "AnyMALLinearProjector", "ClapAudioLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AnyMALPerceiverResampler):
            init.normal_(module.latents, std=1.0)
            if module.frame_embeddings is not None:  # as large as the latents, so frame order is visible from the start
                init.normal_(module.frame_embeddings, std=1.0)

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs):
        """As [`PreTrainedModel.set_attn_implementation`]; a string applies to each sub-model that supports it, the
        others use "eager"."""
        if isinstance(attn_implementation, str):
            attn_implementation = {"": attn_implementation, **attention_per_sub_model(self.config, attn_implementation)}
        return super().set_attn_implementation(attn_implementation, **kwargs)



@auto_docstring(custom_intro="AnyMAL without a language modeling head: encoders, projectors and the language model.")
class AnyMALModel(AnyMALPreTrainedModel):
    def __init__(self, config: AnyMALConfig):
        super().__init__(config)
        # a modality without its own sub-config (video) shares another's encoder, see `modality_encoder`
        own_encoders = [name for name in config.modalities if getattr(config, f"{name}_config") is not None]
        for key, implementation in attention_per_sub_model(config).items():  # a backend asked for by name
            getattr(config, key)._attn_implementation = implementation
        self.encoders = AnyMALEncoders({name: build_encoder(getattr(config, f"{name}_config")) for name in own_encoders})
        self.projectors = nn.ModuleDict({name: build_projector(config, name) for name in config.modalities})
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def modality_encoder(self, name: str) -> nn.Module:
        return self.encoders[name] if name in self.encoders else self.encoders[self.config.modality_specs[name].shares_encoder_with]

    def get_encoder_features(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """Runs the frozen encoder of `name`, without its projector ([`~AnyMALModel.get_modality_features`] runs both);
        the result is what feature caching stores and `forward`'s `encoder_features` takes.

        Perceiver modalities give the encoder's sequence, `(num_items, seq, hidden)` (video:
        `(num_items, frames, seq, hidden)`); linear ones its pooled output, `(num_items, hidden)`.
        """
        self._check_modality_values(name, values)
        spec, encoder = self.config.modality_specs[name], self.modality_encoder(name)
        items = values.flatten(0, 1) if spec.has_frames else values  # frames go through the encoder one by one
        outputs = encoder(items.to(encoder.dtype), return_dict=True)
        features = outputs.last_hidden_state if spec.projector == "perceiver" else outputs.pooler_output
        return features.unflatten(0, values.shape[:2]) if spec.has_frames else features

    def get_modality_features(
        self, name: str, values: torch.Tensor | None = None, encoder_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encodes and projects items of modality `name`, or only projects `encoder_features` computed earlier by
        [`~AnyMALModel.get_encoder_features`]. Returns `(num_items, num_tokens, hidden_size)`."""
        if name not in self.config.modalities:
            raise ValueError(
                f"This model has no {name} modality (it takes {self.config.modalities}); drop the "
                f"{self.config.modality_specs[name].input_name} input or use a checkpoint whose config sets {name}_config."
            )
        if encoder_features is None:
            encoder_features = self.get_encoder_features(name, values)
        else:
            self._check_encoder_features(name, encoder_features)
        return self.projectors[name](encoder_features)

    def _check_encoder_features(self, name: str, features: torch.Tensor):
        spec, width = self.config.modality_specs[name], self.config.get_encoder_config(name).hidden_size
        if not isinstance(features, torch.Tensor) or features.ndim != 1 + spec.feature_rank or features.shape[-1] != width:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            layout = "(items, " + "frames, " * spec.has_frames + "sequence, " * (spec.projector == "perceiver")
            raise ValueError(
                f"encoder_features[{name!r}] has shape {shape} but this model's {name} projector takes "
                f"{layout}{width}), what AnyMALModel.get_encoder_features gives; cache features with this model's encoders."
            )

    def _check_modality_values(self, name: str, values):
        spec, encoder_config = self.config.modality_specs[name], self.config.get_encoder_config(name)
        if not isinstance(values, torch.Tensor):
            raise TypeError(
                f"{spec.input_name} must be a torch.Tensor, got {type(values).__name__}; AnyMALProcessor turns raw "
                f"{name} inputs into one."
            )
        expected = [getattr(encoder_config, field) if field else None for field in spec.item_shape]
        if values.ndim != 1 + len(expected) or any(e not in (None, got) for e, got in zip(expected, values.shape[1:])):
            shape = ", ".join(f"{field}={e}" if e else "any" for field, e in zip(spec.item_shape, expected))
            raise ValueError(
                f"{spec.input_name} has shape {tuple(values.shape)} but this model's {name} encoder takes "
                f"(num_items, {shape}); preprocess {name} inputs with this model's AnyMALProcessor."
            )
        if values.shape[0] == 0:
            raise ValueError(f"{spec.input_name} holds no {name} items; leave it out when there are none.")
        if spec.has_frames and values.shape[1] > self.config.num_frames:
            raise ValueError(
                f"{spec.input_name} has {values.shape[1]} frames per item but the model's temporal embedding has "
                f"num_frames={self.config.num_frames}; sample at most {self.config.num_frames} frames per clip."
            )
        if values.is_floating_point() and not (finite := torch.isfinite(values.flatten(1)).all(1)).all():
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"{spec.input_name} contains NaN or infinite values in {name} item(s) {bad}; fill the gaps (e.g. "
                f"interpolate missing sensor readings) or drop those items."
            )

    def placeholder_positions(
        self, name: str, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> torch.BoolTensor:
        """`(batch, seq)`: where modality `name`'s placeholder tokens are. [`~AnyMALModel.get_placeholder_mask`]
        (transformers' name) expands them to the embeddings' shape after checking them against the items."""
        token_id = getattr(self.config, f"{name}_token_id")
        if input_ids is not None:
            return input_ids == token_id
        placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder).all(-1)

    def get_placeholder_mask(
        self, name: str, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, features: torch.Tensor
    ) -> torch.BoolTensor:
        """Mask for `inputs_embeds.masked_scatter`; checks that the placeholders and the items' tokens match."""
        mask = self.placeholder_positions(name, input_ids, inputs_embeds)
        num_tokens, num_placeholders = self.config.num_tokens[name], int(mask.sum())
        token = self.config.modality_specs[name].token
        if num_placeholders != features.shape[0]:
            raise ValueError(
                f"{name}: the text has {num_placeholders} {token} placeholder tokens ({num_placeholders / num_tokens:g} "
                f"items x {num_tokens}) but {features.shape[0] // num_tokens} {name} items were given "
                f"({features.shape[0]} tokens); put one {token} per item in the text and let AnyMALProcessor expand it."
            )
        edges = F.pad(mask.int(), (1, 1)).diff(dim=-1)  # +1 where a run of placeholders starts, -1 after it
        starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
        lengths = ends[:, 1] - starts[:, 1]
        if (lengths % num_tokens).any():  # each item's tokens are one unbroken run; adjacent items make longer runs
            run = int((lengths % num_tokens).nonzero()[0])
            sample, start, length = int(starts[run, 0]), int(starts[run, 1]), int(lengths[run])
            raise ValueError(
                f"{name}: sample {sample} has a run of {length} {token} tokens at position {start}, "
                f"not a multiple of the {num_tokens} per item: an item's tokens are split by other tokens, or the text "
                f"was truncated inside them. Put one {token} per item in the text and let "
                "AnyMALProcessor expand it."
            )
        return mask.unsqueeze(-1).expand_as(inputs_embeds)

    def embed_modalities(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        modality_values: dict[str, torch.Tensor | None],
        encoder_features: dict[str, torch.Tensor] | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        decoding: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Replaces every placeholder run in `inputs_embeds` with its item's projected tokens. Placeholders without
        their modality's input are an error, except when `decoding` (one new token on a cache): a placeholder there
        is a token the model generated, an ordinary token, and not looking for one spares a device-to-host sync per
        step."""
        encoder_features, mm_encoder_outputs = encoder_features or {}, mm_encoder_outputs or {}
        unknown = (set(encoder_features) | set(mm_encoder_outputs)) - set(self.config.modality_specs)
        if unknown:
            raise ValueError(f"Unknown modalities {sorted(unknown)} in encoder_features/mm_encoder_outputs.")
        projected = {}
        for name, spec in self.config.modality_specs.items():
            sources = {
                spec.input_name: modality_values.get(name),
                f"encoder_features['{name}']": encoder_features.get(name),
                f"mm_encoder_outputs['{name}']": mm_encoder_outputs.get(name),
            }
            given = [source for source, value in sources.items() if value is not None]
            if len(given) > 1:
                raise ValueError(f"{name}: pass only one of {given}.")
            if mm_encoder_outputs.get(name) is not None:  # projected earlier (generate() does it before prefill)
                features = mm_encoder_outputs[name].pooler_output
                features = torch.cat([item.reshape(-1, inputs_embeds.shape[-1]) for item in features])
            elif given:
                features = self.get_modality_features(name, modality_values.get(name), encoder_features.get(name))
                projected[name] = features
                features = features.flatten(0, 1)
            elif (not decoding and input_ids is not None and name in self.config.modalities
                  and self.placeholder_positions(name, input_ids, inputs_embeds).any()):
                raise ValueError(
                    f"The text has {spec.token} placeholder tokens but no {name} input was given; pass "
                    f"{spec.input_name} (or remove the placeholders)."
                )
            else:
                continue
            mask = self.get_placeholder_mask(name, input_ids, inputs_embeds, features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))
        return inputs_embeds, projected

    @can_return_tuple
    @auto_docstring(custom_args=FORWARD_ARGUMENTS)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        imu_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        encoder_features: dict[str, torch.Tensor] | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | AnyMALModelOutputWithPast:
        cache = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if (input_ids if input_ids is not None else inputs_embeds).shape[1] == 0:
            raise ValueError("The input has no tokens (sequence length 0); give at least one token.")
        named_inputs = {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos,
                        "input_features": input_features, "imu_values": imu_values}
        modality_values = {  # modalities added with `register_modality` arrive through **kwargs
            name: named_inputs[spec.input_name] if spec.input_name in named_inputs else kwargs.pop(spec.input_name, None)
            for name, spec in self.config.modality_specs.items()
        }
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if prompt_embeds is not None:  # generate() put the media in place once, before prefill
            if any(values is not None for values in modality_values.values()) or encoder_features or mm_encoder_outputs:
                raise ValueError(
                    "Pass either prompt_embeds or media inputs (pixel_values, ..., encoder_features, "
                    "mm_encoder_outputs), not both: prompt_embeds already holds the media's tokens."
                )
            start = cache.get_seq_length() if cache is not None else 0  # where this input begins in the sequence
            inputs_embeds, projected = self.continue_prompt_embeds(prompt_embeds, inputs_embeds, start), {}
        else:
            inputs_embeds, projected = self.embed_modalities(
                input_ids, inputs_embeds, modality_values, encoder_features, mm_encoder_outputs,
                decoding=cache is not None and inputs_embeds.shape[1] == 1,
            )
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        encoder_outputs = {  # the installed release's per-encoder fields, LLaVA's shape: projected tokens as pooler_output
            f"{name}_outputs": BaseModelOutputWithPooling(pooler_output=tokens)
            for name, tokens in projected.items() if f"{name}_outputs" in ENCODER_OUTPUT_FIELDS
        }
        return AnyMALModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            modality_hidden_states=projected or None,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            **encoder_outputs,
        )

    @staticmethod
    def continue_prompt_embeds(prompt_embeds: torch.Tensor, inputs_embeds: torch.Tensor, start: int) -> torch.Tensor:
        """`inputs_embeds` of the positions from `start` on, those inside the prompt taken from `prompt_embeds`. The
        input may be the whole prompt, a chunk of it (chunked prefill, a cache continued) or the prompt followed by
        generated tokens (decoding without a cache)."""
        if prompt_embeds.shape[0] != inputs_embeds.shape[0]:
            raise ValueError(
                f"prompt_embeds holds {prompt_embeds.shape[0]} samples but the input {inputs_embeds.shape[0]}."
            )
        end = min(prompt_embeds.shape[1], start + inputs_embeds.shape[1])
        if end <= start:
            return inputs_embeds
        prompt_part = prompt_embeds[:, start:end].to(inputs_embeds.device, inputs_embeds.dtype)
        return torch.cat([prompt_part, inputs_embeds[:, end - start :]], dim=1)


@auto_docstring(custom_intro="AnyMAL: any-modality inputs, text out.")
class AnyMALForConditionalGeneration(AnyMALPreTrainedModel, GenerationMixin):
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # decoding steps (after prefill) have no media, no placeholder scans and no host syncs of AnyMAL's own
    _can_compile_fullgraph = True

    def __init__(self, config: AnyMALConfig):
        super().__init__(config)
        self.model = AnyMALModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # tied (when the config says so) to the language model's input embeddings, wherever that decoder keeps them
        # (`embed_tokens` in Llama, `wte` in GPT-2)
        embeddings = self.model.language_model.get_input_embeddings()
        path = next(name for name, module in self.model.language_model.named_modules() if module is embeddings)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{path}.weight"}
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_modality_features(self, name: str, values=None, encoder_features=None) -> torch.Tensor:
        return self.model.get_modality_features(name, values, encoder_features)

    @can_return_tuple
    @auto_docstring(custom_args=FORWARD_ARGUMENTS)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        imu_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        encoder_features: dict[str, torch.Tensor] | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | AnyMALCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            input_features=input_features,
            imu_values=imu_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,  # AnyMALModel resolves the two names
            inputs_embeds=inputs_embeds,
            encoder_features=encoder_features,
            mm_encoder_outputs=mm_encoder_outputs,
            prompt_embeds=prompt_embeds,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return AnyMALCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            modality_hidden_states=outputs.modality_hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            **{field: getattr(outputs, field) for field in ENCODER_OUTPUT_FIELDS},
        )

    # Generation overrides only public methods of GenerationMixin (checked against transformers 5.23 and 5.24; each
    # behaviour has a test in tests/test_generation_anymal.py). generate() encodes every modality once, before
    # prefill, into `prompt_embeds`: one row per sample, so generate's own per-sample expansion for beams and
    # num_return_sequences repeats each sample's media with it, whatever its number of items.
    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 *args, **kwargs):
        """As [`~GenerationMixin.generate`]. Media inputs (`pixel_values`, ..., `encoder_features`,
        `mm_encoder_outputs`) are encoded and projected once, before prefill, and placeholder tokens, which mark
        where inputs go, are never generated."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        media = {name: kwargs.pop(spec.input_name, None) for name, spec in self.config.modality_specs.items()}
        media = {name: values for name, values in media.items() if values is not None}
        encoder_features, mm_encoder_outputs = kwargs.pop("encoder_features", None), kwargs.pop("mm_encoder_outputs", None)
        if getattr(generation_config, "is_assistant", False):
            # the draft model of assisted decoding: transformers hands it the main model's inputs without media, so
            # it reads the placeholders as the tokens they are (as LLaVA's assistants do), and the main model's
            # logits processors, placeholder suppression included; the main model verifies every draft token
            kwargs["prompt_embeds"] = self.get_input_embeddings()(input_ids)
            return super().generate(inputs, generation_config, *args, **kwargs)
        inputs_embeds = kwargs.get("inputs_embeds")
        if input_ids is not None or inputs_embeds is not None:  # the prompt, checked and embedded once, media in place
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            cache = kwargs.get(CACHE_NAME) if kwargs.get(CACHE_NAME) is not None else kwargs.get("past_key_values")
            cached = int(cache.get_seq_length()) if isinstance(cache, Cache) else 0
            if cached and input_ids is not None:  # a continued generation: the cache already holds the media it saw
                media, encoder_features = (
                    {name: items for name, values in given.items()
                     if len(items := self._items_after(name, input_ids, cached, values))}
                    for given in (media, encoder_features or {})
                )
            new_embeds, _ = self.model.embed_modalities(
                input_ids[:, cached:] if input_ids is not None else None, inputs_embeds[:, cached:], media,
                encoder_features, mm_encoder_outputs,
            )
            kwargs["prompt_embeds"] = torch.cat([inputs_embeds[:, :cached], new_embeds], dim=1)
        placeholder_ids = {getattr(self.config, f"{name}_token_id") for name in self.config.modalities}
        suppressed = kwargs.get("suppress_tokens") or (generation_config or self.generation_config).suppress_tokens
        if placeholder_ids:  # added to the user's own suppressed tokens, wherever those were given
            kwargs["suppress_tokens"] = sorted(placeholder_ids | set(suppressed or []))
        return super().generate(inputs, generation_config, *args, **kwargs)

    def _items_after(self, name: str, input_ids: torch.LongTensor, cached: int, values: torch.Tensor) -> torch.Tensor:
        """The items of `name` whose placeholders come after the first `cached` positions: all of `values` when it
        holds only those, the later ones of each sample when it holds the whole prompt's (media passed again)."""
        placeholders = self.model.placeholder_positions(name, input_ids, None)
        per_sample = placeholders.sum(1) // self.config.num_tokens[name]
        in_cache = placeholders[:, :cached].sum(1) // self.config.num_tokens[name]
        if values.shape[0] != int(per_sample.sum()) or not in_cache.any():
            return values
        starts = per_sample.cumsum(0) - per_sample
        keep = torch.cat([torch.arange(int(start + skip), int(start + count))
                          for start, skip, count in zip(starts, in_cache, per_sample)])
        return values[keep.to(values.device)]

    def prepare_inputs_for_generation(
        self, input_ids, *args, inputs_embeds=None, is_first_iteration: bool | None = False, **kwargs
    ):
        # named like GenerationMixin's, where generate() looks for `inputs_embeds` before accepting them
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        prompt_embeds, cache = model_inputs.get("prompt_embeds"), model_inputs.get(CACHE_NAME)
        # after the first forward with a cache (prefill, or an assistant's first draft step, which transformers does
        # not count as a first iteration), the prompt is cached and the input holds generated tokens only
        prompt_cached = prompt_embeds is not None and cache is not None and input_ids.shape[1] > prompt_embeds.shape[1]
        if prompt_cached and not is_first_iteration:
            model_inputs.pop("prompt_embeds")
            # generated tokens are never placeholders (generate suppresses them): they go in as embeddings, which
            # forward does not scan for placeholders, so a decoding step has no host syncs (and compiles whole)
            model_inputs["inputs_embeds"] = self.get_input_embeddings()(model_inputs.pop("input_ids"))
        return model_inputs


__all__ = [
    "AnyMALForConditionalGeneration",
    "AnyMALIMUEncoder",
    "AnyMALLinearProjector",
    "AnyMALModel",
    "AnyMALPerceiverResampler",
    "AnyMALPreTrainedModel",
]
