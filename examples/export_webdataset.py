"""Writes a chat dataset as WebDataset shards, the format the recipes stream (`--streaming`) at scale.

    python examples/export_webdataset.py --dataset_name outputs/anymal-demo/data/train --dataset_from_disk \\
        --splits align --output_dir demo-shards [--samples_per_shard 1000] [--shuffle_seed 0]
    accelerate launch examples/align.py --model_name_or_path outputs/anymal-demo/base --dataset_name demo-shards \\
        --dataset_config image --dataset_train_split align --streaming --dataloader_num_workers 1 --output_dir out

Rows are chats as the recipes read them (see examples/sft.py), one item per modality at most. <output_dir> gets one
shard set per combination of modalities (`image/`, `audio/`, `image-audio/`, ...; `datasets` wants every sample of a
WebDataset to hold the same files), `<split>-<n>.tar` in each, and a README.md naming each set as a config, which
`--dataset_config` picks. Media are written losslessly (see transformers_anymal/webdataset_anymal.py), so training on
the shards sees the very values of the rows. Streams are read in shard order: --shuffle_seed writes the rows
shuffled, as img2dataset's output is.
"""

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True, help="Hub dataset or local path")
    parser.add_argument("--dataset_from_disk", action="store_true", help="read dataset_name with load_from_disk")
    parser.add_argument("--dataset_config", help="dataset configuration name")
    parser.add_argument("--splits", nargs="+", help="splits to write (default: all)")
    parser.add_argument("--output_dir", required=True, help="where the shard sets and README.md go")
    parser.add_argument("--samples_per_shard", type=int, default=1000, help="samples per .tar shard")
    parser.add_argument("--shuffle_seed", type=int, help="write the rows in an order shuffled with this seed")
    parser.add_argument("--imu_sampling_rate", type=int, help="rate (Hz) of IMU recordings whose rows don't say")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    args = parse_args(argv)
    from pathlib import Path

    from transformers_anymal.training_anymal import load_dataset_dict
    from transformers_anymal.webdataset_anymal import write_webdataset

    if Path(args.output_dir).exists() and any(Path(args.output_dir).glob("*/*.tar")):
        raise ValueError(f"{args.output_dir} already holds shards; write to a new folder (or delete it).")
    dataset = load_dataset_dict(args.dataset_name, args.dataset_from_disk, args.dataset_config)
    unknown = sorted(set(args.splits or []) - set(dataset))
    if unknown:
        raise ValueError(f"no split {', '.join(unknown)} in {args.dataset_name}; it has {', '.join(dataset)}.")
    written = {}
    for split in args.splits or list(dataset):
        rows = dataset[split] if args.shuffle_seed is None else dataset[split].shuffle(seed=args.shuffle_seed)
        rates = {"imu": args.imu_sampling_rate} if args.imu_sampling_rate else {}
        written[split] = write_webdataset(rows, args.output_dir, split, args.samples_per_shard, rates, len(rows))
        print(f"{split}: {written[split]} samples by shard set")
    return written


if __name__ == "__main__":
    main()
