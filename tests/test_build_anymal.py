"""examples/build_anymal.py composes AnyMAL from tiny component checkpoints saved here, as it would from the Hub."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForMultimodalLM,
    AutoProcessor,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from transformers_anymal import AnyMALDataCollator, AnyMALIMUConfig, AnyMALIMUEncoder, AnyMALIMUFeatureExtractor
from transformers_anymal.processing_anymal import chatml_chat_template, llama2_chat_template

from anymal_tester import TINY
from child_process import run_python


SCRIPT = TINY.parents[1] / "examples" / "build_anymal.py"
CHATML_OF_THE_LLM = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                     "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                     "{% endif %}")
TOWER = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def build(*args):
    return run_python(SCRIPT, *args, timeout=300)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny stand-ins for Llama-2-chat, CLIP, CLAP and a converted IMU2CLIP encoder, saved like Hub checkpoints."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    words = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "what", "is", "the", "person", "doing", "?", "running"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    clip = CLIPModel(CLIPConfig(text_config={**TOWER, "vocab_size": 50},
                                vision_config={**TOWER, "image_size": 32, "patch_size": 8}, projection_dim=8))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    clap = ClapModel(ClapConfig(
        text_config={**TOWER, "vocab_size": 50}, projection_dim=8,
        audio_config={"hidden_size": 32, "patch_embeds_hidden_size": 16, "depths": [1, 1], "num_attention_heads": [2, 2],
                      "window_size": 8, "patch_size": 8, "patch_stride": [8, 8]}))
    clap.save_pretrained(root / "clap")
    ClapFeatureExtractor().save_pretrained(root / "clap")
    imu = AnyMALIMUEncoder(AnyMALIMUConfig(hidden_size=24))
    imu.save_pretrained(root / "imu")
    imu.save_pretrained(root / "imu-normalised")  # with the feature extractor it was trained behind
    AnyMALIMUFeatureExtractor(mean=[0.5] * 6, std=[2.0] * 6).save_pretrained(root / "imu-normalised")

    chatml_words = [*words, "<|im_start|>", "<|im_end|>", "user", "assistant"]  # a ChatML LLM, as SmolLM2 or Qwen2
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(chatml_words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    chatml = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    chatml.chat_template = CHATML_OF_THE_LLM
    LlamaForCausalLM(LlamaConfig(vocab_size=len(chatml_words), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 eos_token_id=chatml.eos_token_id)).save_pretrained(root / "chatml-llm")
    chatml.save_pretrained(root / "chatml-llm")
    return {"root": root, "llm": llm.eval(), "clip": clip.eval(), "clap": clap.eval(), "imu": imu.eval()}


def test_composed_model_keeps_every_components_weights(parts):
    root = parts["root"]
    result = build("--llm", root / "llm", "--image_encoder", root / "clip", "--audio_encoder", root / "clap",
                   "--imu_encoder", root / "imu", "--config", TINY, "--output_dir", root / "anymal")
    assert result.returncode == 0, result.stderr
    model = AutoModelForMultimodalLM.from_pretrained(root / "anymal").eval()
    processor = AutoProcessor.from_pretrained(root / "anymal")
    assert model.config.modalities == ["image", "video", "audio", "imu"]
    assert model.config.num_tokens == {"image": 8, "video": 8, "audio": 4, "imu": 4}  # from --config

    with torch.no_grad():
        pixels, mel, recordings = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 100, 64), torch.randn(2, 6, 1000)
        assert torch.equal(model.model.encoders["image"](pixels).last_hidden_state,
                           parts["clip"].vision_model(pixels).last_hidden_state)
        assert torch.equal(model.model.encoders["audio"](mel).pooler_output, parts["clap"].audio_model(mel).pooler_output)
        assert torch.equal(model.model.encoders["imu"](recordings).pooler_output, parts["imu"](recordings).pooler_output)
        text = torch.tensor([[1, 3, 5, 6, 7, 8, 9, 10, 4]])
        vocab = parts["llm"].config.vocab_size
        assert torch.allclose(model(input_ids=text).logits[..., :vocab], parts["llm"](input_ids=text).logits)

    tokenizer = processor.tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>", "<audio>", "<imu>")] == [
        model.config.image_token_id, model.config.video_token_id, model.config.audio_token_id, model.config.imu_token_id]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    for name, projector in model.model.projectors.items():
        assert all(torch.isfinite(p).all() for p in projector.parameters()), name

    messages = [{"role": "user", "content": [{"type": "imu", "imu": np.random.randn(6, 400), "sampling_rate": 100},
                                             {"type": "text", "text": "what is the person doing ?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_num_tokens_sets_tokens_per_item_over_the_configs(parts):
    root = parts["root"]
    result = build("--llm", root / "llm", "--image_encoder", root / "clip", "--config", TINY, "--num_tokens",
                   "image=2,video=3", "--output_dir", root / "few-tokens")
    assert result.returncode == 0, result.stderr
    processor = AutoProcessor.from_pretrained(root / "few-tokens")
    config = AutoModelForMultimodalLM.from_pretrained(root / "few-tokens").config
    assert config.num_tokens == {"image": 2, "video": 3}
    chat = [{"role": "user", "content": [{"type": "image", "image": np.zeros((32, 32, 3), np.uint8)}]}]
    inputs = processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    assert (inputs["input_ids"] == config.image_token_id).sum() == 2  # the processor expands each item to 2 tokens

    # --seed (default 0) fixes the new weights: the same seed rebuilds them bit for bit, another does not
    for name, seed in (("same-seed", "0"), ("other-seed", "1")):
        build("--llm", root / "llm", "--image_encoder", root / "clip", "--config", TINY, "--num_tokens",
              "image=2,video=3", "--seed", seed, "--output_dir", root / name)
    weights = {name: load_file(root / name / "model.safetensors") for name in ("few-tokens", "same-seed", "other-seed")}
    new = [key for key in weights["few-tokens"] if ".projectors." in key or "embed_tokens" in key]
    assert all(torch.equal(weights["few-tokens"][key], weights["same-seed"][key]) for key in new)
    assert not all(torch.equal(weights["few-tokens"][key], weights["other-seed"][key]) for key in new)
    for option, message in [("image=0", "at least 1"), ("depth=2", "unknown modalities"),
                            ("image:2", "modality=count pairs"), ("audio=2", "which this model does not take")]:
        result = run_python(SCRIPT, "--llm", root / "llm", "--image_encoder", root / "clip", "--num_tokens", option,
                            "--output_dir", root / "refused", check=False, timeout=300)
        assert result.returncode != 0 and message in result.stderr, (option, result.stderr[-500:])


def test_the_chat_template_follows_the_llms_format(parts):
    root = parts["root"]
    build("--llm", root / "chatml-llm", "--imu_encoder", root / "imu", "--output_dir", root / "chatml")
    processor = AutoProcessor.from_pretrained(root / "chatml")
    assert processor.modalities == ["imu"]  # the tokenizer holds the placeholders of the model's modalities only
    assert processor.chat_template == chatml_chat_template(["imu"])
    chat = [{"role": "user", "content": [{"type": "imu", "imu": np.random.randn(6, 400), "sampling_rate": 100},
                                         {"type": "text", "text": "what is the person doing ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "running"}]}]
    assert processor.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\n<imu>\nwhat is the person doing ?<|im_end|>\n<|im_start|>assistant\nrunning<|im_end|>\n")
    assert processor.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")
    batch = AnyMALDataCollator(processor)([{"messages": chat}])
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.convert_ids_to_tokens(answer) == ["running", "<|im_end|>"]  # the answer and its end

    build("--llm", root / "llm", "--imu_encoder", root / "imu", "--output_dir", root / "llama2")
    assert AutoProcessor.from_pretrained(root / "llama2").chat_template == llama2_chat_template(["imu"])


def test_the_imu_encoders_own_feature_extractor_is_kept(parts):
    root = parts["root"]
    build("--llm", root / "llm", "--imu_encoder", root / "imu-normalised", "--output_dir", root / "normalised")
    extractor = AutoProcessor.from_pretrained(root / "normalised").imu_feature_extractor
    assert list(extractor.mean) == [0.5] * 6 and list(extractor.std) == [2.0] * 6


def test_any_subset_of_modalities(parts):
    root = parts["root"]
    result = build("--llm", root / "llm", "--imu_encoder", root / "imu", "--output_dir", root / "imu-only")
    assert result.returncode == 0, result.stderr
    model = AutoModelForMultimodalLM.from_pretrained(root / "imu-only")
    assert model.config.modalities == ["imu"] and list(model.model.encoders) == ["imu"]


def test_no_encoder_is_an_error(parts):
    result = run_python(SCRIPT, "--llm", parts["root"] / "llm", "--output_dir", parts["root"] / "nothing", check=False)
    assert result.returncode != 0 and "Give at least one of --image_encoder" in result.stderr


def test_help_documents_every_option():
    help_text = build("--help").stdout
    options = re.findall(r"add_argument\(\"(--\w+)\"", SCRIPT.read_text())
    assert options and all(option in help_text for option in options)
