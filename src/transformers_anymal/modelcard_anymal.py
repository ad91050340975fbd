"""The model card that `AnyMALForConditionalGeneration.push_to_hub` writes."""

import os
import re

from huggingface_hub import ModelCard, ModelCardData

from .configuration_anymal import AnyMALConfig


def _hub_id(config) -> str | None:
    """The Hub repo a component config was loaded from, if it came from the Hub."""
    name = getattr(config, "_name_or_path", "") or ""
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name) else None


def anymal_model_card(
    config: AnyMALConfig,
    repo_id: str,
    datasets: list[str] | None = None,
    training_stages: list[str] | None = None,
) -> ModelCard:
    """A card with Hub metadata, the modalities (encoder, projector, tokens per item), usage and training."""
    encoders = {name: config.get_encoder_config(name) for name in config.modalities}
    datasets = [dataset for dataset in datasets or [] if not os.path.exists(dataset)]  # Hub datasets, not local paths
    base_models = [hub_id for part in (config.text_config, *encoders.values()) if (hub_id := _hub_id(part))]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="any-to-any",
        tags=["anymal", "multimodal", *config.modalities, "custom_code"],
        base_model=list(dict.fromkeys(base_models)) or None,
        datasets=datasets or None,
    )
    rows = "\n".join(
        f"| {name} | `{config.modality_specs[name].token}` | {_hub_id(encoder) or encoder.model_type} "
        f"| {'Perceiver Resampler' if config.modality_specs[name].projector == 'perceiver' else 'linear'} "
        f"| {config.num_tokens[name]} |"
        for name, encoder in encoders.items()
    )
    llm = _hub_id(config.text_config) or config.text_config.model_type
    stages = "\n".join(f"{index}. {stage}" for index, stage in enumerate(training_stages or [], 1))
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

[AnyMAL](https://arxiv.org/abs/2309.16058) (Any-Modality Augmented Language Model): the language model {llm} reads
{", ".join(config.modalities)} through pretrained encoders whose outputs small projectors turn into a fixed number of
its token embeddings.

| modality | placeholder | encoder | projector | tokens per item |
| --- | --- | --- | --- | --- |
{rows}

## Use

```python
from transformers import pipeline

pipe = pipeline("any-to-text", model="{repo_id}", trust_remote_code=True)
messages = [{{"role": "user", "content": [
    {{"type": "image", "path": "photo.jpg"}},
    {{"type": "text", "text": "What is happening here?"}},
]}}]
print(pipe(messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])
```

With `pip install transformers-anymal` and `import transformers_anymal`, `AutoModelForMultimodalLM` and
`AutoProcessor` load it without `trust_remote_code`.

## Training

{stages or "Not recorded."}
{"" if not datasets else chr(10) + "Datasets: " + ", ".join(datasets) + chr(10)}"""
    return ModelCard(content)
