"""examples/plan_memory.py: its weight figures are what a loaded model holds (tiny, really quantized) and what the
meta model holds (7B, 13B, 70B); its activation estimate is close to what autograd keeps."""

import importlib.util
from collections import Counter

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForMultimodalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from trl import ModelConfig

from transformers_anymal.training_anymal import lora_config, projector_tuning_config

from anymal_tester import TINY, tiny_model
from child_process import run_python


EXAMPLES = TINY.parents[1] / "examples"
spec = importlib.util.spec_from_file_location("plan_memory", EXAMPLES / "plan_memory.py")
plan_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plan_memory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("anymal-tiny")
    tiny_model().save_pretrained(path)
    return path


def held_bytes(parameter) -> int:
    """What a loaded parameter really occupies: its storage and, when quantized, its quantization constants."""
    tensors = [parameter.data]
    if isinstance(parameter, bnb.nn.Params4bit):
        state = parameter.quant_state
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
    if isinstance(parameter, bnb.nn.Int8Params):
        tensors.append(parameter.SCB)
    return sum(tensor.untyped_storage().nbytes() for tensor in tensors)


def by_part(model) -> Counter:
    totals = Counter()
    for name, parameter in model.named_parameters():
        totals[plan_memory.part_of(name), parameter.requires_grad] += held_bytes(parameter)
    return totals


def planned_by_part(memory) -> Counter:
    totals = Counter()
    for row in memory.weights:
        totals[row.part, row.trainable] += row.bytes
    return totals


RECIPES = {  # as examples/align.py and examples/sft.py set the model up
    "align fp32": dict(stage="align", dtype=torch.float32, bits=None),
    "align bf16": dict(stage="align", dtype=torch.bfloat16, bits=None),
    "align 4-bit": dict(stage="align", dtype=torch.bfloat16, bits=4),
    "align 4-bit nested": dict(stage="align", dtype=torch.float32, bits=4, nested=True),
    "align 8-bit": dict(stage="align", dtype=torch.float32, bits=8),
    "sft QLoRA": dict(stage="sft", dtype=torch.bfloat16, bits=4),
    "sft full": dict(stage="sft", dtype=torch.float32, bits=None, use_peft=False),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_weights_equal_what_the_loaded_tiny_model_holds(checkpoint, recipe):
    options = RECIPES[recipe]
    bits, stage, use_peft = options["bits"], options["stage"], options.get("use_peft", True)
    quantization = None
    if bits:
        quantization = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8,
                                          bnb_4bit_use_double_quant=options.get("nested", False),
                                          bnb_4bit_compute_dtype=options["dtype"])
    model = AutoModelForMultimodalLM.from_pretrained(checkpoint, dtype=options["dtype"], quantization_config=quantization)
    model.set_trainable(language_model=stage == "sft" and not use_peft, encoders=False, projectors=True)
    if stage == "align" and bits:
        model = get_peft_model(model, projector_tuning_config(model))
    if stage == "sft" and use_peft:
        model = get_peft_model(model, lora_config(model, ModelConfig(lora_r=4)))

    memory = plan_memory.plan(AutoConfig.from_pretrained(checkpoint), lora_r=4, **options)
    assert planned_by_part(memory) == by_part(model)
    trainable = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()
                    if parameter.requires_grad)
    assert memory.gradients == trainable and memory.optimizer == 2 * trainable
    if bits:  # the language model's linear layers are counted quantized, the rest of the model is not
        assert any(row.dtype == f"{bits}-bit" for row in memory.weights)
        assert all(row.part == "language model" for row in memory.weights if row.dtype == f"{bits}-bit")


def meta_bytes(module: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())


@pytest.mark.parametrize("name", ["anymal-tiny", "anymal-7b", "anymal-13b", "anymal-70b"])
def test_weights_equal_what_the_meta_model_holds(name):
    config = AutoConfig.from_pretrained(TINY.parent / name)
    with torch.device("meta"):
        model = AutoModelForMultimodalLM.from_config(config, dtype=torch.bfloat16)
    parts = {"language model": meta_bytes(model.model.language_model) + meta_bytes(model.lm_head)}
    parts |= {f"{modality} encoder": meta_bytes(encoder) for modality, encoder in model.model.encoders.items()}
    parts |= {f"{modality} projector": meta_bytes(projector) for modality, projector in model.model.projectors.items()}

    memory = plan_memory.plan(config, stage="align", dtype=torch.bfloat16)  # no quantization: no PEFT copies
    assert {row.part: row.bytes for row in memory.weights} == parts
    assert memory.weight_bytes == meta_bytes(model)

    quantized = plan_memory.plan(config, stage="align", dtype=torch.bfloat16, bits=4)
    linear_weights = sum(module.weight.numel() for module in model.model.language_model.modules()
                         if isinstance(module, nn.Linear))
    assert sum(row.parameters for row in quantized.weights if row.dtype == "4-bit") == linear_weights
    copies = sum(row.bytes for row in quantized.weights if row.part.endswith(" projector (trained copy)"))
    assert copies == meta_bytes(model.model.projectors) == quantized.gradients  # LN-tuning copies train, in full


def saved_for_backward(model: nn.Module, batch_size: int, sequence_length: int) -> int:
    """Bytes autograd keeps for backward in one training forward: distinct storages, parameters excluded."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    embeddings = torch.randn(batch_size, sequence_length, model.config.hidden_size, requires_grad=True)
    labels = torch.randint(model.config.vocab_size, (batch_size, sequence_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs_embeds=embeddings, labels=labels)
    return sum(saved.values())


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "LoRA"])
def test_activation_estimate_is_close_to_what_autograd_keeps(lora):
    config = LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=500, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train().requires_grad_(False)
    if lora:
        targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]
        # no dropout: on CPU its masks are float, where the plan counts CUDA's bool masks
        model = get_peft_model(model, LoraConfig(r=8, lora_dropout=0.0, target_modules=targets))
    measured = saved_for_backward(model, batch_size=2, sequence_length=96)
    estimate = plan_memory.activation_bytes(config, 2, 96, torch.float32, 8 if lora else None,
                                            gradient_checkpointing=False, lora_dropout=0.0)
    logits = 2 * 96 * config.vocab_size * 4  # the plan also counts the logits' gradient, created in backward
    assert estimate - logits == pytest.approx(measured, rel=0.1)


def test_plan_of_the_paper_setting_prints_each_figure_and_a_verdict():
    command = ["--config", str(TINY.parent / "anymal-70b"), "--stage", "align", "--load_in_4bit",
               "--per_device_train_batch_size", "4", "--gradient_checkpointing", "--dtype", "bfloat16"]
    output = run_python(EXAMPLES / "plan_memory.py", *command, timeout=300).stdout
    memory = plan_memory.main(command)
    for figure in ("weights, all", "gradients", "AdamW states", "activations (estimate", "total"):
        assert figure in output
    assert f"{memory.total / 2**30:.2f} GiB" in output
    assert "verdict: fits on one 80 GiB GPU" in output and "single 80 GB GPU with batch size 4" in output
    too_small = run_python(EXAMPLES / "plan_memory.py", *command, "--gpu_memory_gib", "40", timeout=300).stdout
    assert "verdict: does NOT fit on one 40 GiB GPU" in too_small
