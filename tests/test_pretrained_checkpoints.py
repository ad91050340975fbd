"""AnyMAL built by examples/build_anymal.py from real pretrained checkpoints keeps what each part knows. Needs the
checkpoints (the Hub, or its cache), so it runs only with RUN_SLOW=1. `ANYMAL_TEST_LLM`, `ANYMAL_TEST_IMAGE_ENCODER`
and `ANYMAL_TEST_AUDIO_ENCODER` name other checkpoints or local folders."""

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMultimodalLM, AutoProcessor, AutoTokenizer, CLIPVisionModel

from anymal_tester import TINY
from child_process import run_python


CHECKPOINTS = {
    "llm": os.environ.get("ANYMAL_TEST_LLM", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "image": os.environ.get("ANYMAL_TEST_IMAGE_ENCODER", "openai/clip-vit-base-patch32"),
    "audio": os.environ.get("ANYMAL_TEST_AUDIO_ENCODER", "laion/clap-htsat-unfused"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("anymal-pretrained")
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}  # the Hub, or its cache
    run_python(TINY.parents[1] / "examples" / "build_anymal.py", "--llm", CHECKPOINTS["llm"], "--image_encoder",
               CHECKPOINTS["image"], "--audio_encoder", CHECKPOINTS["audio"], "--output_dir", path, env=environment,
               timeout=1800)
    return path


@pytest.mark.slow
def test_the_language_model_answers_as_it_did_alone(built):
    model = AutoModelForMultimodalLM.from_pretrained(built).eval()
    llm = AutoModelForCausalLM.from_pretrained(CHECKPOINTS["llm"]).eval()
    inputs = AutoTokenizer.from_pretrained(CHECKPOINTS["llm"])("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        alone = llm.generate(**inputs, max_new_tokens=8, do_sample=False)
        composed = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(composed, alone)


@pytest.mark.slow
def test_the_image_encoder_gives_the_pretrained_features(built):
    model = AutoModelForMultimodalLM.from_pretrained(built).eval()
    processor = AutoProcessor.from_pretrained(built)
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    clip = CLIPVisionModel.from_pretrained(CHECKPOINTS["image"]).eval()
    with torch.no_grad():
        expected = clip(pixel_values=inputs["pixel_values"]).last_hidden_state
        assert torch.allclose(model.model.get_encoder_features("image", inputs["pixel_values"]), expected, atol=1e-5)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
