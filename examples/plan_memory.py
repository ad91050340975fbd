"""How much memory one training process of examples/align.py or examples/sft.py needs, before renting the GPU.

    python examples/plan_memory.py --config hub_configs/anymal-70b --stage align --load_in_4bit \\
        --per_device_train_batch_size 4 --gradient_checkpointing [--dtype bfloat16] [--gpu_memory_gib 80]

Nothing is allocated: the model is built on the meta device with the recipe's own set-up (`set_trainable`, the
PEFT config of the stage), so the weights are those of the real run, part by part and dtype by dtype. The language
model's linear layers count as bitsandbytes stores them under --load_in_4bit/--load_in_8bit (packed weights and
quantization constants); everything else keeps --dtype, as `from_pretrained(dtype=...)` leaves it. Gradients and
AdamW's two states are counted for the trainable parameters in their own dtype.

Activations are an estimate: what autograd keeps for backward through a Llama decoder with SDPA/flash attention
(no sequence x sequence scores), per token and layer, plus the fp32 logits of the loss; frozen encoders keep
nothing. With --gradient_checkpointing only each layer's input is kept, and one layer at a time is recomputed.
CUDA's context, kernel workspaces and allocator fragmentation are not counted: the verdict keeps a reserve for them.
"""

import argparse
import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMultimodalLM
from trl import ModelConfig

from transformers_anymal.training_anymal import lora_config, peft_model, projector_tuning_config


GIB = 2**30
RESERVE_GIB = 2.0  # CUDA context, cuBLAS/attention workspaces, allocator fragmentation
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' default, which transformers' BitsAndBytesConfig uses
BNB_NESTED_BLOCKSIZE = 256  # blocks of absmax values that nested (double) quantization quantizes together
RECIPE_DEFAULTS = {field.name: field.default for field in fields(ModelConfig)}
PAPER_CLAIM = ("the paper (§3.1): with 4-bit and 8-bit quantization the 70B model trains on a single 80 GB GPU "
               "with batch size 4")


@dataclass
class WeightRow:
    part: str
    dtype: str
    parameters: int
    bytes: int
    trainable: bool


@dataclass
class MemoryPlan:
    weights: list[WeightRow]
    gradients: int
    optimizer: int
    activations: int
    sequence_length: int

    @property
    def weight_bytes(self) -> int:
        return sum(row.bytes for row in self.weights)

    @property
    def total(self) -> int:
        return self.weight_bytes + self.gradients + self.optimizer + self.activations

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total <= (gpu_memory_gib - RESERVE_GIB) * GIB


def quantized_bytes(linear: nn.Linear, bits: int, nested: bool) -> int:
    """Bytes bitsandbytes holds for a quantized linear layer's weight: packed values and quantization constants."""
    numel = linear.weight.numel()
    if bits == 8:  # int8 values and one fp32 scale per output row (SCB)
        return numel + 4 * linear.out_features
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    code = 16 * 4  # the 16 fp32 values of the NF4/FP4 code
    if not nested:
        return math.ceil(numel / 2) + 4 * blocks + code
    # absmax quantized to uint8, with its own fp32 absmax per 256 blocks, a 256-value code and an fp32 offset
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 256 * 4 + 4 + code


def part_of(name: str) -> str:
    """'language model', 'image encoder', 'image projector', 'LoRA adapters', ... from a parameter's name."""
    if ".lora_" in name:
        return "LoRA adapters"
    if "modules_to_save." in name or "ln_tuning_layers." in name:  # PEFT's trainable copy of a whole module
        return f"{part_of(name.replace('modules_to_save.', '').replace('ln_tuning_layers.', ''))} (trained copy)"
    name = name.removeprefix("base_model.model.")
    if name.startswith(("model.language_model.", "lm_head.")):
        return "language model"
    for kind in ("encoders", "projectors"):
        if name.startswith(f"model.{kind}."):
            return f"{name.split('.')[2]} {kind[:-1]}"
    return name


def build_training_model(config, stage: str, dtype: torch.dtype, quantized: bool, use_peft: bool, lora_r: int):
    """The model as the stage's recipe trains it, on the meta device."""
    with torch.device("meta"):
        model = AutoModelForMultimodalLM.from_config(config, dtype=dtype)
    language_model = stage == "sft" and not use_peft
    model.set_trainable(language_model=language_model, encoders=False, projectors=True)
    if stage == "align" and quantized:  # align.py: the projectors train as PEFT's LN-tuning copies
        return peft_model(model, projector_tuning_config(model))
    if stage == "sft" and use_peft:  # sft.py: LoRA on the language model, the projectors as modules_to_save
        return peft_model(model, lora_config(model, ModelConfig(lora_r=lora_r)))
    return model


def weight_rows(model: nn.Module, bits: int | None, nested: bool) -> list[WeightRow]:
    """Bytes held per (part, dtype, trainable); linear layers of the language model quantized when `bits` is set."""
    quantized = {}
    if bits:
        for name, module in model.named_modules():
            is_lm_head = name.removeprefix("base_model.model.").startswith("lm_head")
            if type(module) is nn.Linear and part_of(name) == "language model" and not is_lm_head:
                quantized[module.weight] = quantized_bytes(module, bits, nested)
    rows: dict[tuple, WeightRow] = {}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        dtype = f"{bits}-bit" if parameter in quantized else str(parameter.dtype).removeprefix("torch.")
        held = quantized.get(parameter, parameter.numel() * parameter.element_size())
        row = rows.setdefault((part, dtype, parameter.requires_grad),
                              WeightRow(part, dtype, 0, 0, parameter.requires_grad))
        row.parameters += parameter.numel()
        row.bytes += held
    return list(rows.values())


def activation_bytes(text_config, batch_size: int, sequence_length: int, dtype: torch.dtype, lora_r: int | None,
                     gradient_checkpointing: bool, lora_dropout: float = RECIPE_DEFAULTS["lora_dropout"]) -> int:
    """An estimate of what autograd keeps for backward through the language model (see the module's docstring)."""
    hidden, intermediate, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    q_hidden, kv_hidden = heads * head_dim, text_config.num_key_value_heads * head_dim
    size = torch.finfo(dtype).bits // 8
    # two RMSNorm inputs (upcast to fp32), attention's q, k, v and output, SiLU's input, the gate and up products,
    # and attention's fp32 log-sum-exp per head
    per_token = 2 * hidden * 4 + (2 * q_hidden + 2 * kv_hidden + 3 * intermediate) * size + heads * 4
    if lora_r:  # the 7 adapted layers keep their input for lora_A and lora_A's rank-r output for lora_B
        per_token += 7 * lora_r * size
        if lora_dropout:  # each layer drops out its own copy of the input and keeps the (bool, on GPU) mask
            per_token += (6 * hidden + intermediate) * (size + 1)
        else:  # q/k/v and gate/up share an input; o_proj's and down_proj's are their own
            per_token += (3 * hidden + intermediate) * size
    tokens = batch_size * sequence_length
    logits = tokens * text_config.vocab_size * (4 + 4 + size)  # fp32 log-softmax kept, its gradient, the bf16 logits
    if gradient_checkpointing:
        return tokens * (layers * hidden * size + per_token) + logits
    return tokens * layers * per_token + logits


def plan(config, stage: str = "align", dtype: torch.dtype = torch.float32, bits: int | None = None,
         nested: bool = False, use_peft: bool = True, lora_r: int = 16, per_device_train_batch_size: int = 8,
         sequence_length: int | None = None, gradient_checkpointing: bool = False) -> MemoryPlan:
    if bits and stage == "sft" and not use_peft:
        raise ValueError("A 4-bit/8-bit language model cannot be trained in full: keep --use_peft (QLoRA).")
    model = build_training_model(config, stage, dtype, bool(bits), use_peft, lora_r)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    trainable_bytes = sum(parameter.numel() * parameter.element_size() for parameter in trainable)
    if sequence_length is None:  # one item of the longest modality and a 128-token text
        sequence_length = max(config.num_tokens.values()) + 128
    return MemoryPlan(
        weights=weight_rows(model, bits, nested),
        gradients=trainable_bytes,
        optimizer=2 * trainable_bytes,  # AdamW's exp_avg and exp_avg_sq, in each parameter's dtype
        activations=activation_bytes(config.text_config, per_device_train_batch_size, sequence_length, dtype,
                                     lora_r if stage == "sft" and use_peft else None, gradient_checkpointing),
        sequence_length=sequence_length,
    )


def gib(value: int) -> str:
    return f"{value / GIB:8.2f} GiB"


def report(memory: MemoryPlan, gpu_memory_gib: float) -> str:
    width = max(len(row.part) for row in memory.weights) + 2
    lines = [f"{'weights':<{width}}{'dtype':>10}{'trains':>8}{'parameters':>17}{'memory':>13}"]
    for row in sorted(memory.weights, key=lambda row: -row.bytes):
        trains = "yes" if row.trainable else "no"
        lines.append(f"  {row.part:<{width - 2}}{row.dtype:>10}{trains:>8}{row.parameters:>17,}{gib(row.bytes):>13}")
    total_width = width + 35
    lines += [
        f"{'weights, all':<{total_width}}{gib(memory.weight_bytes):>13}",
        f"{'gradients of the trainable parameters':<{total_width}}{gib(memory.gradients):>13}",
        f"{'AdamW states (2 per trainable parameter)':<{total_width}}{gib(memory.optimizer):>13}",
        f"{f'activations (estimate, {memory.sequence_length} tokens per sample)':<{total_width}}"
        f"{gib(memory.activations):>13}",
        f"{'total':<{total_width}}{gib(memory.total):>13}",
    ]
    verdict = "fits" if memory.fits(gpu_memory_gib) else "does NOT fit"
    lines.append(f"verdict: {verdict} on one {gpu_memory_gib:g} GiB GPU per process "
                 f"(keeping {RESERVE_GIB:g} GiB for CUDA's context, workspaces and fragmentation)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="AnyMAL checkpoint or config folder (or Hub id)")
    parser.add_argument("--stage", choices=["align", "sft"], default="align",
                        help="align: examples/align.py (projectors only); sft: examples/sft.py (LoRA + projectors)")
    parser.add_argument("--dtype", default=RECIPE_DEFAULTS["dtype"],
                        help="dtype the recipe loads the model in (its --dtype; default %(default)s)")
    parser.add_argument("--load_in_4bit", action="store_true", help="language model in 4-bit (bitsandbytes)")
    parser.add_argument("--load_in_8bit", action="store_true", help="language model in 8-bit (bitsandbytes)")
    parser.add_argument("--use_bnb_nested_quant", action="store_true", help="4-bit with nested quantization")
    parser.add_argument("--no_peft", action="store_true", help="sft: train the language model in full")
    parser.add_argument("--lora_r", type=int, default=RECIPE_DEFAULTS["lora_r"], help="LoRA rank (default %(default)s)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8, help="samples per step and process")
    parser.add_argument("--sequence_length", type=int, default=None,
                        help="tokens per sample (default: the longest modality's tokens + 128 of text)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--gpu_memory_gib", type=float, default=80, help="memory of one GPU (default %(default)s)")
    args = parser.parse_args(argv)
    if args.load_in_4bit and args.load_in_8bit:
        parser.error("choose one of --load_in_4bit and --load_in_8bit")
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        parser.error(f"--dtype {args.dtype} is not a torch dtype (float32, bfloat16, float16)")
    return args


def main(argv: list[str] | None = None) -> MemoryPlan:
    args = parse_args(argv)
    config = AutoConfig.from_pretrained(args.config)
    memory = plan(
        config,
        stage=args.stage,
        dtype=getattr(torch, args.dtype),
        bits=4 if args.load_in_4bit else 8 if args.load_in_8bit else None,
        nested=args.use_bnb_nested_quant,
        use_peft=not args.no_peft,
        lora_r=args.lora_r,
        per_device_train_batch_size=args.per_device_train_batch_size,
        sequence_length=args.sequence_length,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    print(report(memory, args.gpu_memory_gib))
    print(f"for comparison, {PAPER_CLAIM}")
    return memory


if __name__ == "__main__":
    main()
