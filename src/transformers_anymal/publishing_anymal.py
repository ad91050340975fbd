"""Publishing AnyMAL checkpoints: the code files and `auto_map` that let transformers alone load them with
`trust_remote_code=True`, the any-to-text pipeline's registration, and the model card."""

import os
import shutil
from pathlib import Path

from .modelcard_anymal import anymal_model_card


# written into saved configs, so that only transformers and `trust_remote_code=True` are needed to load them
AUTO_MAP = {
    "AutoConfig": "configuration_anymal.AnyMALConfig",
    "AutoModel": "modeling_anymal.AnyMALModel",
    "AutoModelForImageTextToText": "modeling_anymal.AnyMALForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_anymal.AnyMALForConditionalGeneration",
}
CUSTOM_PIPELINES = {
    "any-to-text": {"impl": "pipeline_anymal.AnyToTextPipeline", "pt": ["AutoModelForMultimodalLM"], "tf": [],
                    "type": "multimodal"},
}
PIPELINE_FILES = ("pipeline_anymal.py", "safety_anymal.py")  # the pipeline and its own import, copied beside the model


class AnyMALPublishingMixin:
    """`save_pretrained` and `push_to_hub` of AnyMAL models: with the pipeline's code, and a model card on the Hub."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # transformers copies the model's module and its imports; add the pipeline's
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
            for name in PIPELINE_FILES:
                if (source := Path(__file__).with_name(name)).exists():
                    os.makedirs(save_directory, exist_ok=True)
                    shutil.copy(source, save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *args, datasets: list[str] | None = None,
                    training_stages: list[str] | None = None, **kwargs):
        """As [`PreTrainedModel.push_to_hub`], plus the any-to-text pipeline and a model card naming the modalities,
        their encoders and token budgets, and the training `datasets` and `training_stages` when given."""
        # only pushed configs name the pipeline: for a local checkpoint, pipeline() would then ask for
        # trust_remote_code instead of using the registered one
        self.config.custom_pipelines = CUSTOM_PIPELINES
        try:
            commit = super().push_to_hub(repo_id, *args, **kwargs)
        finally:
            del self.config.custom_pipelines
        repo_id = commit.repo_url.repo_id
        card = anymal_model_card(self.config, repo_id, datasets, training_stages)
        card.push_to_hub(repo_id, token=kwargs.get("token"), commit_message="Add AnyMAL model card")
        return commit
