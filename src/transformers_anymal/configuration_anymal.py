"""AnyMAL configuration: the modality table, the IMU encoder's config and the composite model config."""

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

# first, so that an unsupported transformers is named before an import below fails on it
from .compatibility_anymal import SUPPORTED_RANGE  # noqa: F401


# isort: split
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import auto_docstring


@dataclass(frozen=True)
class ModalitySpec:
    """Everything the model, the processor, the chat template and the collator need to know about one modality."""

    token: str  # placeholder the processor expands, e.g. "<audio>"
    input_name: str  # keyword that forward() receives
    encoder_type: str  # default `model_type` of the frozen encoder
    projector: Literal["perceiver", "linear"]  # perceiver reads the encoder's sequence, linear its pooled output
    item_shape: tuple[str | None, ...]  # per-item dims, each named by the encoder-config field it must equal
    num_tokens: int = 64  # default LLM tokens per item
    # the kind of media, named as in transformers' `input_modalities` ("image", "video", "audio", "time"): how the
    # processor recognises and reads raw items (media_anymal.MEDIA_KINDS) and which kwargs section they take
    input_modality: str = "image"
    has_frames: bool = False  # items are stacks of frames: (frames, *item_shape[1:]), with a temporal embedding
    shares_encoder_with: str | None = None  # without its own `<name>_config`, reuse this modality's encoder
    # the processor's keyword for the items (pipeline's too); the collator reads bare blocks' items from the dataset
    # columns `<name>s` (a list per row) and `<name>` (one per row). `register_modality` defaults it to the name.
    argument: str | None = None
    # the processor attribute that turns read items into the model's input (a sub-processor such as
    # "image_processor"), or a function `preprocess(items, **options) -> torch.Tensor` given the raw items
    preprocess: str | Callable | None = None

    @property
    def feature_rank(self) -> int:
        """Dimensions of one item's encoder features (what `AnyMALModel.get_encoder_features` gives per item, and cached
        `encoder_features` hold): a vector for a linear projector, a sequence of them for a Perceiver one, and one
        such per frame for items with frames."""
        return 1 + (self.projector == "perceiver") + self.has_frames

    def to_dict(self) -> dict:
        """The spec as JSON, for a config to record (a `preprocess` function is not recordable and becomes None)."""
        recorded = asdict(self)
        if callable(self.preprocess):
            recorded["preprocess"] = None
        return recorded

    @classmethod
    def from_dict(cls, recorded: dict) -> "ModalitySpec":
        known = {field.name for field in fields(cls)}
        if unknown := sorted(set(recorded) - known):
            raise ValueError(f"A recorded modality has fields {unknown} that this version of ModalitySpec lacks; "
                             "upgrade transformers-anymal.")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in recorded.items()})


MODALITIES: dict[str, ModalitySpec] = {
    "image": ModalitySpec("<image>", "pixel_values", "clip_vision_model", "perceiver",
                          ("num_channels", "image_size", "image_size"), argument="images", preprocess="image_processor"),
    "video": ModalitySpec("<video>", "pixel_values_videos", "clip_vision_model", "perceiver",
                          (None, "num_channels", "image_size", "image_size"), input_modality="video",
                          has_frames=True, shares_encoder_with="image", argument="videos",
                          preprocess="video_processor"),
    "audio": ModalitySpec("<audio>", "input_features", "clap_audio_model", "linear", (None, None, "num_mel_bins"),
                          num_tokens=32, input_modality="audio", argument="audio", preprocess="feature_extractor"),
    "imu": ModalitySpec("<imu>", "imu_values", "anymal_imu", "linear", ("num_channels", "window_length"),
                        num_tokens=32, input_modality="time", argument="imu",  # encoder registered in this package
                        preprocess="imu_feature_extractor"),
}
BUILT_IN = frozenset(MODALITIES)
INPUT_MODALITIES = ("image", "video", "audio", "time")  # the kinds of media the processor reads (media_anymal.py)
# config fields (`text_config`) and chat-row columns (`messages`, `prompt`, `completion`) a modality's name would shadow
RESERVED_NAMES = ("text", "message", "messages", "prompt", "completion")


@auto_docstring(custom_intro="Configuration of [`AnyMALIMUEncoder`], compatible with IMU2CLIP's `MW2StackRNNPooling`.")
@strict
class AnyMALIMUConfig(PreTrainedConfig):
    r"""
    num_channels (`int`, *optional*, defaults to 6):
        Sensor channels: 3 accelerometer axes and 3 gyroscope axes.
    conv_channels (`int`, *optional*, defaults to 32):
        Channels of the three dilated convolution blocks.
    kernel_sizes (`list[int]`, *optional*, defaults to `(10, 5, 5)`):
        Kernel size of each convolution block.
    dilation (`int`, *optional*, defaults to 2):
        Dilation of every convolution.
    pool_size (`int`, *optional*, defaults to 3):
        Max-pooling window after every convolution.
    hidden_size (`int`, *optional*, defaults to 512):
        Size of the GRU state, which is the embedding of a recording.
    window_length (`int`, *optional*, defaults to 1000):
        Time steps per recording (IMU2CLIP: 5 s at 200 Hz).
    sampling_rate (`int`, *optional*, defaults to 200):
        Sampling rate in Hz that the encoder was trained on.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the normal initializer of the convolutions.

    As in IMU2CLIP, the GRU reads the convolution channels as its time axis and the pooled time steps as its
    features, so its input size is the time length left after the three blocks (32 for 1000 steps).
    """

    model_type = "anymal_imu"

    num_channels: int = 6
    conv_channels: int = 32
    kernel_sizes: list[int] | tuple[int, ...] = (10, 5, 5)
    dilation: int = 2
    pool_size: int = 3
    hidden_size: int = 512
    window_length: int = 1000
    sampling_rate: int = 200
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_channels % 2 or self.conv_channels % 4:
            raise ValueError(
                f"AnyMALIMUConfig: num_channels ({self.num_channels}) must be even and conv_channels "
                f"({self.conv_channels}) a multiple of 4, for the encoder's GroupNorm(2, ...) and GroupNorm(4, ...)."
            )
        if self.pooled_length < 1:
            raise ValueError(
                f"AnyMALIMUConfig: window_length={self.window_length} is too short for kernel_sizes="
                f"{list(self.kernel_sizes)}, dilation={self.dilation} and pool_size={self.pool_size}; use a longer window."
            )

    @property
    def pooled_length(self) -> int:
        """Time steps left after the convolution blocks: the GRU's input size."""
        length = self.window_length
        for kernel_size in self.kernel_sizes:
            length = (length - self.dilation * (kernel_size - 1)) // self.pool_size
        return length


def _encoder_sub_config(spec: ModalitySpec) -> SubConfigSpec:
    if spec.encoder_type == AnyMALIMUConfig.model_type:  # resolvable without the AutoConfig registration
        return SubConfigSpec(config_class=AnyMALIMUConfig, optional=True)
    return SubConfigSpec(config_class=AutoConfig, model_type=spec.encoder_type, optional=True)


@auto_docstring(custom_intro="Configuration of [`AnyMALModel`] and [`AnyMALForConditionalGeneration`].")
@strict
class AnyMALConfig(PreTrainedConfig):
    r"""
    image_config (`dict` or `PreTrainedConfig`, *optional*):
        Config of the image encoder (CLIP ViT in the paper). Without it the model has no image input.
    video_config (`dict` or `PreTrainedConfig`, *optional*):
        Config of a separate video frame encoder. Without it, videos go through the image encoder.
    audio_config (`dict` or `PreTrainedConfig`, *optional*):
        Config of the audio encoder (CLAP's `clap_audio_model` in the paper).
    imu_config (`dict` or `AnyMALIMUConfig`, *optional*):
        Config of the IMU encoder ([`AnyMALIMUConfig`]).
    image_token_id (`int`, *optional*):
        Id of the `<image>` placeholder. A modality is enabled by setting its placeholder id.
    video_token_id (`int`, *optional*):
        Id of the `<video>` placeholder.
    audio_token_id (`int`, *optional*):
        Id of the `<audio>` placeholder.
    imu_token_id (`int`, *optional*):
        Id of the `<imu>` placeholder.
    added_modalities (`dict[str, dict]`, *optional*):
        The `ModalitySpec` of each modality the model takes beyond the built-in four, recorded when the config is
        made, so that a checkpoint with one loads in a fresh process (its spec is registered on load).
    num_tokens (`dict[str, int]`, *optional*):
        LLM tokens that one item of each modality costs, e.g. `{"image": 64, "audio": 32}`. Modalities left out
        take the default of their `ModalitySpec`.
    num_frames (`int`, *optional*, defaults to 8):
        Most frames per video clip: the size of the learned temporal embedding.
    resampler_depth (`int`, *optional*, defaults to 2):
        Layers of each Perceiver Resampler.
    resampler_num_heads (`int`, *optional*, defaults to 8):
        Attention heads of each Perceiver Resampler layer.
    resampler_head_dim (`int`, *optional*, defaults to 64):
        Size of each Perceiver Resampler attention head.
    """

    model_type = "anymal"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        **{f"{name}_config": _encoder_sub_config(spec) for name, spec in MODALITIES.items()},
    }

    text_config: dict | PreTrainedConfig | None = None
    image_config: dict | PreTrainedConfig | None = None
    video_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    imu_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    audio_token_id: int | None = None
    imu_token_id: int | None = None
    added_modalities: dict[str, dict] | None = None
    num_tokens: dict[str, int] | None = None
    num_frames: int = 8
    resampler_depth: int = 2
    resampler_num_heads: int = 8
    resampler_head_dim: int = 64
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        register_recorded_modalities(self.added_modalities)
        for name in MODALITIES:  # modalities added by `register_modality` have no dataclass fields
            for key in (f"{name}_config", f"{name}_token_id"):
                if key not in self.__dataclass_fields__:
                    setattr(self, key, kwargs.pop(key, None))
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True  # checkpoints of tied LLMs keep the flag in their text config
        self._validate_modalities()
        self.num_tokens = {name: (self.num_tokens or {}).get(name, MODALITIES[name].num_tokens)
                           for name in self.modalities}
        self.added_modalities = recorded_modalities(self.modalities)

    @property
    def modality_specs(self) -> dict[str, ModalitySpec]:
        """The spec of every modality known where this config's class lives (built-in, registered, or recorded by a
        loaded config). Models read specs here: with `trust_remote_code`, transformers loads the config's and the
        model's code as separate module copies, each with its own registry."""
        return MODALITIES

    @property
    def modalities(self) -> list[str]:
        """The modalities this model takes: those whose placeholder token id is set."""
        return [name for name in MODALITIES if getattr(self, f"{name}_token_id", None) is not None]

    def get_encoder_config(self, name: str) -> PreTrainedConfig:
        """Config of the encoder that `name` items go through (its own, or the one it shares)."""
        config = getattr(self, f"{name}_config", None)
        if config is None and (shared := MODALITIES[name].shares_encoder_with) is not None:
            config = getattr(self, f"{shared}_config", None)
        return config

    def _validate_modalities(self):
        unknown = set(self.num_tokens or {}) - set(MODALITIES)
        if unknown:
            raise ValueError(
                f"num_tokens names modalities this process does not know: {sorted(unknown)} (known: "
                f"{list(MODALITIES)}). A checkpoint with an added modality loads after the same "
                f"`register_modality({sorted(unknown)[0]!r}, ModalitySpec(...))` that built it has run; run it first."
            )
        token_ids = {}
        for name, spec in MODALITIES.items():
            token_id = getattr(self, f"{name}_token_id", None)
            has_config = getattr(self, f"{name}_config", None) is not None
            if token_id is None:
                if has_config:
                    raise ValueError(
                        f"{name}_config is set but {name}_token_id is not: add the {spec.token} placeholder to the "
                        f"tokenizer and pass its id as {name}_token_id, or drop {name}_config."
                    )
                continue
            encoder_config = self.get_encoder_config(name)
            if encoder_config is None:
                shared = f" or {spec.shares_encoder_with}_config" if spec.shares_encoder_with else ""
                raise ValueError(f"{name}_token_id is set, so the {name} modality needs {name}_config{shared}.")
            if not isinstance(getattr(encoder_config, "hidden_size", None), int):
                raise ValueError(
                    f"The {name} encoder ({encoder_config.model_type}) has no integer hidden_size, so its features "
                    f"cannot be projected; use an encoder whose config gives the width of its outputs as hidden_size."
                )
            if not 0 <= token_id < self.text_config.vocab_size:
                raise ValueError(
                    f"{name}_token_id={token_id} is outside the language model's vocabulary "
                    f"(vocab_size={self.text_config.vocab_size}); resize the embeddings after adding {spec.token}."
                )
            if token_id in token_ids:
                raise ValueError(f"{name}_token_id and {token_ids[token_id]}_token_id are both {token_id}.")
            token_ids[token_id] = name


def register_modality(name: str, spec: ModalitySpec) -> None:
    """Adds a modality to AnyMAL: configs then take `<name>_config`/`<name>_token_id`, models built from them encode
    `spec.input_name` inputs with the encoder and projector the spec names, and processors whose tokenizer holds
    `spec.token` take its items (keyword `spec.argument`, chat blocks `{"type": name, name: ...}`), read as the media
    kind `spec.input_modality` and preprocessed by `spec.preprocess`. Configs record the spec, so checkpoints load in
    a fresh process without this call (unless `preprocess` is a function, which a config cannot record)."""
    if not name.isidentifier():
        raise ValueError(f"Modality name {name!r} must be a valid Python identifier, e.g. 'depth'.")
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in modality; register a new one under another name.")
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} names something else in configs or chat rows ({', '.join(RESERVED_NAMES)}); "
                         "pick another modality name.")
    argument = spec.argument or name
    for other, known in MODALITIES.items():
        taken = {"token": known.token == spec.token, "input_name": known.input_name == spec.input_name,
                 "argument": known.argument == argument}
        if other != name and any(taken.values()):
            field = next(field for field, same in taken.items() if same)
            raise ValueError(f"ModalitySpec.{field} of {name!r} is already {other!r}'s; give each modality its own.")
    if spec.input_modality not in INPUT_MODALITIES:
        raise ValueError(f"ModalitySpec(input_modality={spec.input_modality!r}) is not a kind of media the processor "
                         f"reads; use one of {list(INPUT_MODALITIES)}.")
    MODALITIES[name] = replace(spec, argument=argument)
    AnyMALConfig.sub_configs_defaults[f"{name}_config"] = _encoder_sub_config(spec)


def unregister_modality(name: str) -> None:
    """Removes a modality that `register_modality` (or a loaded config) added."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in modality and cannot be removed.")
    del MODALITIES[name]
    del AnyMALConfig.sub_configs_defaults[f"{name}_config"]


def recorded_modalities(names: list[str]) -> dict[str, dict] | None:
    """The specs of the added modalities among `names`, as configs record them."""
    return {name: MODALITIES[name].to_dict() for name in names if name not in BUILT_IN} or None


def register_recorded_modalities(recorded: dict[str, dict] | None) -> None:
    """Registers the recorded specs of a saved config or processor that this process does not know yet; a spec
    registered here already (by `register_modality`, with its `preprocess` function, say) is kept."""
    for name, spec in (recorded or {}).items():
        if name not in MODALITIES:
            register_modality(name, ModalitySpec.from_dict(spec))
            continue
        known = MODALITIES[name].to_dict()
        differing = [key for key, value in ModalitySpec.from_dict(spec).to_dict().items()
                     if known.get(key) != value and not (key == "preprocess" and value is None)]
        if differing:
            raise ValueError(
                f"This checkpoint's {name!r} modality differs from the one registered in this process in "
                f"{differing}; a process holds one spec per name: load it in a fresh process, or register the "
                f"modality under another name when building one of the two."
            )


__all__ = ["AnyMALConfig", "AnyMALIMUConfig", "MODALITIES", "ModalitySpec", "register_modality", "unregister_modality"]
