"""AnyMAL (Any-Modality Augmented Language Model) for Hugging Face transformers."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
)

from .configuration_anymal import MODALITIES, AnyMALConfig, AnyMALIMUConfig, ModalitySpec, register_modality
from .modeling_anymal import (
    AnyMALForConditionalGeneration,
    AnyMALIMUEncoder,
    AnyMALLinearProjector,
    AnyMALModel,
    AnyMALPerceiverResampler,
    AnyMALPreTrainedModel,
)


__version__ = "0.1.0"

AutoConfig.register("anymal", AnyMALConfig, exist_ok=True)
AutoConfig.register("anymal_imu", AnyMALIMUConfig, exist_ok=True)
AutoModel.register(AnyMALConfig, AnyMALModel, exist_ok=True)
AutoModel.register(AnyMALIMUConfig, AnyMALIMUEncoder, exist_ok=True)
AutoModelForImageTextToText.register(AnyMALConfig, AnyMALForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(AnyMALConfig, AnyMALForConditionalGeneration, exist_ok=True)

__all__ = [
    "MODALITIES",
    "AnyMALConfig",
    "AnyMALForConditionalGeneration",
    "AnyMALIMUConfig",
    "AnyMALIMUEncoder",
    "AnyMALLinearProjector",
    "AnyMALModel",
    "AnyMALPerceiverResampler",
    "AnyMALPreTrainedModel",
    "ModalitySpec",
    "register_modality",
]
