"""AnyMAL (Any-Modality Augmented Language Model) for Hugging Face transformers."""

# first, so that an unsupported transformers is named before an import below fails on it
from .compatibility_anymal import SUPPORTED_RANGE


# isort: split
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoVideoProcessor,
)

from .collator_anymal import AnyMALDataCollator
from .configuration_anymal import (
    MODALITIES,
    AnyMALConfig,
    AnyMALIMUConfig,
    ModalitySpec,
    register_modality,
    unregister_modality,
)
from .feature_extraction_anymal import AnyMALIMUFeatureExtractor
from .modeling_anymal import (
    AnyMALForConditionalGeneration,
    AnyMALIMUEncoder,
    AnyMALLinearProjector,
    AnyMALModel,
    AnyMALPerceiverResampler,
    AnyMALPreTrainedModel,
)
from .pipeline_anymal import AnyToTextPipeline
from .processing_anymal import AnyMALProcessor, EncoderFeatures
from .safety_anymal import (
    AnyMALSafetyChecker,
    ClassifierCheck,
    GuardModelCheck,
    NudeNetCheck,
    OutputGuard,
    ProfanityCheck,
    SafetyVerdict,
)
from .video_processing_anymal import AnyMALVideoProcessor


__version__ = "0.1.0"

AutoConfig.register("anymal", AnyMALConfig, exist_ok=True)
AutoConfig.register("anymal_imu", AnyMALIMUConfig, exist_ok=True)
AutoModel.register(AnyMALConfig, AnyMALModel, exist_ok=True)
AutoModel.register(AnyMALIMUConfig, AnyMALIMUEncoder, exist_ok=True)
AutoModelForImageTextToText.register(AnyMALConfig, AnyMALForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(AnyMALConfig, AnyMALForConditionalGeneration, exist_ok=True)
AutoFeatureExtractor.register(AnyMALIMUConfig, AnyMALIMUFeatureExtractor, exist_ok=True)
AutoVideoProcessor.register(AnyMALConfig, AnyMALVideoProcessor, exist_ok=True)
AutoProcessor.register(AnyMALConfig, AnyMALProcessor, exist_ok=True)

# saved checkpoints carry these classes' code and an auto_map, for `trust_remote_code=True` without this package
AnyMALConfig.register_for_auto_class()
AnyMALForConditionalGeneration.register_for_auto_class("AutoModelForMultimodalLM")
AnyMALModel.register_for_auto_class("AutoModel")
AnyMALProcessor.register_for_auto_class()
AnyMALVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = [
    "MODALITIES",
    "SUPPORTED_RANGE",
    "AnyMALConfig",
    "AnyMALDataCollator",
    "AnyMALForConditionalGeneration",
    "AnyMALIMUConfig",
    "AnyMALIMUEncoder",
    "AnyMALIMUFeatureExtractor",
    "AnyMALLinearProjector",
    "AnyMALModel",
    "AnyMALPerceiverResampler",
    "AnyMALPreTrainedModel",
    "AnyMALProcessor",
    "AnyMALSafetyChecker",
    "AnyMALVideoProcessor",
    "AnyToTextPipeline",
    "ClassifierCheck",
    "EncoderFeatures",
    "GuardModelCheck",
    "ModalitySpec",
    "NudeNetCheck",
    "OutputGuard",
    "ProfanityCheck",
    "SafetyVerdict",
    "register_modality",
    "unregister_modality",
]
