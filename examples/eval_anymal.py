"""Evaluates an AnyMAL checkpoint on a dataset of chats with batched greedy generation and writes a JSON report.

    python examples/eval_anymal.py --model_name_or_path anymal-sft --dataset_name my/mm-eval --split test \\
        --output_dir eval [--dataset_from_disk | --streaming] [--batch_size 8] [--max_new_tokens 32] \
        [--imu_sampling_rate 100]

Rows are chats as for training (see AnyMALDataCollator): the final assistant turn is the reference, which the model
does not see; an `answers` column (a list of strings, e.g. VQAv2's ten human answers or several captions) replaces it
when present. The report has caption metrics (BLEU-4, ROUGE-L, CIDEr-D), VQAv2 accuracy, exact-match accuracy (after
VQA normalisation), per `--group_by` column value when given, and every prediction.
"""

import argparse
import itertools
import json
import math
from collections import defaultdict
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="AnyMAL checkpoint (Hub id or path)")
    parser.add_argument("--dataset_name", required=True, help="Hub dataset or local path")
    parser.add_argument("--dataset_from_disk", action="store_true", help="read dataset_name with load_from_disk")
    parser.add_argument("--dataset_config", help="dataset configuration name")
    parser.add_argument("--streaming", action="store_true",
                        help="stream dataset_name (WebDataset .tar shards, parquet, ...) instead of loading it")
    parser.add_argument("--split", default="test", help="split to evaluate")
    parser.add_argument("--output_dir", required=True, help="where report.json goes")
    parser.add_argument("--batch_size", type=int, default=8, help="chats generated together")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="longest answer generated")
    parser.add_argument("--imu_sampling_rate", type=int, help="rate (Hz) of IMU columns that don't say")
    parser.add_argument("--group_by", help="a column whose values get metrics of their own, e.g. the modality")
    parser.add_argument("--zero_inputs", action="store_true",
                        help="ablation: replace every modality input (or cached encoder feature) by zeros; accuracy "
                             "should fall to chance")
    parser.add_argument("--device", help="where the model runs (default: cuda when there is a GPU, else cpu)")
    return parser.parse_args(argv)


def score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    from transformers_anymal.metrics_anymal import caption_metrics, multiple_choice_accuracy, vqa_accuracy

    return {**caption_metrics(predictions, references),
            "vqa_accuracy": sum(map(vqa_accuracy, predictions, references)) / len(predictions),
            "exact_match": multiple_choice_accuracy(predictions, [refs[0] for refs in references]),
            "count": len(predictions)}


def main(argv=None):
    args = parse_args(argv)
    import torch  # after parsing, so that --help answers at once
    from tqdm.auto import tqdm
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    from transformers_anymal import MODALITIES, AnyMALDataCollator
    from transformers_anymal.training_anymal import first_rows, load_dataset_dict

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForMultimodalLM.from_pretrained(args.model_name_or_path).to(args.device).eval()
    collator = AnyMALDataCollator(processor, sampling_rates={"imu": args.imu_sampling_rate} if args.imu_sampling_rate else {})
    dataset = load_dataset_dict(args.dataset_name, args.dataset_from_disk, args.dataset_config, args.streaming)[args.split]
    collator.check_dataset(first_rows(dataset), model.config.modalities, name=f"{args.split} split")

    samples = []
    rows_left = iter(dataset)
    batches = iter(lambda: list(itertools.islice(rows_left, args.batch_size)), [])
    total = None if args.streaming else math.ceil(len(dataset) / args.batch_size)
    for batch_index, rows in enumerate(tqdm(batches, total=total, desc="generating", unit="batch")):
        start = batch_index * args.batch_size
        chats = [collator.chat(row, start + offset) for offset, row in enumerate(rows)]
        prompts = [chat[:-1] if chat[-1]["role"] == "assistant" else chat for chat in chats]
        inputs = processor.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               processor_kwargs={"padding_side": "left"}, return_tensors="pt").to(args.device)
        if args.zero_inputs:  # media, and features of rows written by cache_features.py
            for spec in MODALITIES.values():
                if spec.input_name in inputs:
                    inputs[spec.input_name] = torch.zeros_like(inputs[spec.input_name])
            if "encoder_features" in inputs:
                inputs["encoder_features"] = {name: torch.zeros_like(v) for name, v in inputs["encoder_features"].items()}
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for row, chat, answer in zip(rows, chats, answers):
            reference = chat[-1]["content"] if chat[-1]["role"] == "assistant" else ""
            if isinstance(reference, list):
                reference = " ".join(block["text"] for block in reference if block.get("type") == "text")
            samples.append({"prediction": answer.strip(), "references": list(row.get("answers") or [reference]),
                            **({"group": row[args.group_by]} if args.group_by else {})})

    report = {"model": args.model_name_or_path, "dataset": args.dataset_name, "split": args.split,
              "zero_inputs": args.zero_inputs,
              "overall": score([s["prediction"] for s in samples], [s["references"] for s in samples])}
    if args.group_by:
        groups = defaultdict(list)
        for sample in samples:
            groups[sample["group"]].append(sample)
        report["by_" + args.group_by] = {group: score([s["prediction"] for s in members], [s["references"] for s in members])
                                         for group, members in sorted(groups.items())}
    report["samples"] = samples
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(args.output_dir) / "report.json", "w") as file:
        json.dump(report, file, indent=2)
    print(json.dumps({key: value for key, value in report.items() if key != "samples"}, indent=2))
    return report


if __name__ == "__main__":
    main()
