"""The main job: AnyMAL's whole recipe at toy scale on real bundled data, run by `accelerate launch examples/sft.py`.

1. data: digits (image), moving digits (video), spoken digits (audio), BasicMotions (IMU), see `data.py`;
2. pretrained parts: a small language model trained on the demo's text and four encoders, see `model.py`;
3. features: `examples/cache_features.py` runs the frozen encoders over the training data once;
4. stage 1, alignment: `examples/align.py` trains only the projectors, on captions;
5. stage 2, instruction tuning: `examples/sft.py` trains LoRA adapters and the projectors, on questions, and merges;
6. evaluation: `examples/eval_anymal.py` on held-out data, again with every modality input zeroed (the ablation);
   `report.json` and a table; the final checkpoint answers through `pipeline("any-to-text")`.
Steps 3-6 run the same scripts, with the options printed, that scale to anymal-70b (see the README).
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
from datasets import DatasetDict

from .console import disk_usage, log_to, say, size
from .data import CAPTION_PROMPTS, IMU_SAMPLING_RATE, build_demo_dataset, chance, load_media
from .model import build_config, build_processor, pretrain_encoders, pretrain_language_model


KINDS = ["image", "video", "audio", "imu", "pair"]
KIND_LABELS = {"imu": "IMU", "pair": "two modalities"}
TARGETS = {"image": 0.9, "video": 0.9, "audio": 0.9, "imu": 0.8, "pair": 0.8}
ABLATION_MARGIN = 0.1


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
    if out.exists() and any(out.iterdir()):
        say(f"{out} holds an earlier run: every step runs again and overwrites it.")
    with log_to(out / "run.log", verbose):
        report = run_steps(out, seed)
    say(table(report))
    say(f"\nThe final checkpoint, through pipeline('any-to-text'): {report['pipeline_answer']}")
    say(f"{'All targets met' if report['passed'] else 'Targets MISSED'} in {report['seconds']} s.")
    say(f"\n  final checkpoint  {report['checkpoint']}  (plain; pipeline('any-to-text') and from_pretrained load it)")
    say(f"  report            {out / 'report.json'}  (every prediction: {out}/eval*/report.json)")
    if not verbose:
        say(f"  log               {out / 'run.log'}  (each step's command line and output; --verbose shows it here)")
    cached = disk_usage(out / "data") + disk_usage(out / "features")
    say(f"  disk              {size(disk_usage(out))} in {out}, of which {size(cached)} cached data "
        f"({out}/data, {out}/features: safe to delete)")
    return report


def run_steps(out: Path, seed: int) -> dict:
    import align
    import cache_features
    import eval_anymal
    import sft

    start = time.time()
    step = lambda text: say(f"\n[{time.time() - start:5.0f}s] {text}")  # noqa: E731

    print(f"torch threads: {torch.get_num_threads()}")
    step("1/6 data: digits, moving digits, spoken digits, BasicMotions")
    media = load_media(seed)
    dataset = build_demo_dataset(media, seed)
    DatasetDict(align=dataset["align"], sft=dataset["sft"]).save_to_disk(out / "data" / "train")
    DatasetDict(test=dataset["test"], test_captions=dataset["test_captions"]).save_to_disk(out / "data" / "heldout")
    print({split: len(rows) for split, rows in dataset.items()})

    step("2/6 pretrained parts: a language model on the demo's text, the four encoders on their classes")
    from transformers_anymal import AnyMALForConditionalGeneration

    recordings = np.concatenate([x for x, _ in media["imu"]["train"]], axis=1)
    processor = build_processor(recordings.mean(1).tolist(), recordings.std(1).tolist())
    torch.manual_seed(seed)
    model = AnyMALForConditionalGeneration(build_config(processor))
    texts = sorted({processor.apply_chat_template(text_only(messages), tokenize=False)
                    for split in ("align", "sft") for messages in dataset[split]["messages"]})
    pretrain_language_model(model, processor, texts, str(out / "pretraining"), epochs=8, seed=seed)
    probes = pretrain_encoders(model, processor, media, seed)
    print(f"held-out accuracy of a linear probe on each pretrained encoder: {probes}")
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")

    common = ["--per_device_train_batch_size", "64", "--logging_steps", "25", "--save_strategy", "no", "--report_to",
              "none", "--seed", str(seed), "--lr_scheduler_type", "cosine", "--warmup_steps", "20", "--gradient_checkpointing", "false",
              "--dataloader_num_workers", "1"]
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
            "--dataset_train_split", "align", "--output_dir", out / "aligned", "--num_train_epochs", "4",
            "--learning_rate", "3e-3", *common]),
        "5/6 stage 2, instruction tuning: LoRA on the language model, projectors": ("accelerate launch examples/sft.py",
                                                                                    sft.cli, [
            "--model_name_or_path", out / "aligned", "--dataset_name", out / "features",
            "--dataset_train_split", "sft", "--output_dir", out / "instructed", "--num_train_epochs", "3",
            "--learning_rate", "2e-3", "--lora_r", "16", "--lora_alpha", "32", "--merge", *common]),
    }
    shutil.rmtree(out / "features", ignore_errors=True)  # cache_features.py would go on from an earlier run's shards
    for title, (script, run, argv) in stages.items():
        step(title)
        argv = [str(arg) for arg in argv]
        print(f"\n{script} {shlex.join(argv)}", flush=True)
        run(argv)

    step("6/6 evaluation on held-out data")
    final = out / "instructed" / "merged"
    evaluation = ["--model_name_or_path", str(final), "--dataset_name", str(out / "data" / "heldout"),
                  "--dataset_from_disk", "--group_by", "kind", "--batch_size", "64", "--max_new_tokens", "12",
                  "--imu_sampling_rate", str(IMU_SAMPLING_RATE)]
    answers = eval_anymal.main([*evaluation, "--split", "test", "--output_dir", str(out / "eval")])
    ablation = eval_anymal.main([*evaluation, "--split", "test", "--zero_inputs", "--output_dir", str(out / "eval-ablation")])
    captions = eval_anymal.main([*evaluation, "--split", "test_captions", "--output_dir", str(out / "eval-captions")])
    report = {
        "heldout_accuracy": {kind: answers["by_kind"][kind]["exact_match"] for kind in KINDS},
        "ablation_accuracy": {kind: ablation["by_kind"][kind]["exact_match"] for kind in KINDS},
        "chance": chance(dataset["test"]),
        "caption_cider_d": {kind: captions["by_kind"][kind]["cider_d"] for kind in CAPTION_PROMPTS},
        "caption_bleu4": {kind: captions["by_kind"][kind]["bleu4"] for kind in CAPTION_PROMPTS},
        "heldout_count": {kind: answers["by_kind"][kind]["count"] for kind in KINDS},
        "encoder_probe_accuracy": probes,
        "targets": TARGETS,
        "checkpoint": str(final),
        "pipeline_answer": pipeline_answer(final, dataset["test"]),
        "seconds": round(time.time() - start),
    }
    report["passed"] = all(report["heldout_accuracy"][kind] >= TARGETS[kind]
                           and abs(report["ablation_accuracy"][kind] - report["chance"][kind]) <= ABLATION_MARGIN
                           for kind in KINDS)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def text_only(messages: list[dict]) -> list[dict]:
    """The chat with its media blocks left out: what the language model is pretrained on."""
    return [{**message, "content": [block for block in message["content"] if block["type"] == "text"]}
            for message in messages]


def table(report: dict) -> str:
    rows = [f"\n{'held out':15} {'accuracy':>9} {'target':>7} {'zeroed':>7} {'chance':>7} {'CIDEr-D':>8} {'count':>6}"]
    for kind in KINDS:
        cider = report["caption_cider_d"].get(kind)
        rows.append(f"{KIND_LABELS.get(kind, kind):15} {report['heldout_accuracy'][kind]:9.3f} {TARGETS[kind]:7.2f} "
                    f"{report['ablation_accuracy'][kind]:7.3f} {report['chance'][kind]:7.3f} "
                    f"{'-' if cider is None else f'{cider:.3f}':>8} {report['heldout_count'][kind]:6d}")
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
