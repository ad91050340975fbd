"""Runs the frozen encoders over a dataset once and stores their outputs, so alignment trains without them.

    python examples/cache_features.py --model_name_or_path anymal-7b-init --dataset_name my/captions \\
        --output_dir my-captions-features [--imu_sampling_rate 100] [--dtype float16]
    accelerate launch examples/align.py --model_name_or_path anymal-7b-init --dataset_name my-captions-features \\
        --dataset_from_disk --output_dir anymal-7b-aligned

Each row keeps its chat and gets a `<modality>_features` column (one flat array per item, in block order) and a
`<modality>_feature_shape` column (one item's shape) in place of its media columns; AnyMALDataCollator then passes
them to the model as `encoder_features`. Features are what the encoders give before the projectors, so the
projectors still train. Written with `save_to_disk`. Items are stored flat because datasets converts nested lists to
numpy element by element (about 70 ViT-L items/s per core here) and flat ones whole (over 2,000/s).
"""

import argparse


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="AnyMAL checkpoint whose encoders to run")
    parser.add_argument("--dataset_name", required=True, help="Hub dataset or local path")
    parser.add_argument("--dataset_from_disk", action="store_true", help="read dataset_name with load_from_disk")
    parser.add_argument("--dataset_config", help="dataset configuration name")
    parser.add_argument("--output_dir", required=True, help="where to save_to_disk the dataset with features")
    parser.add_argument("--imu_sampling_rate", type=int, help="rate (Hz) of IMU columns that don't say")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                        help="precision the features are stored in")
    parser.add_argument("--batch_size", type=int, default=32, help="rows encoded together")
    parser.add_argument("--device", help="where the model runs (default: cuda when there is a GPU, else cpu)")
    args = parser.parse_args(argv)
    import torch  # after parsing, so that --help answers at once
    from datasets import Features
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    from transformers_anymal import MODALITIES, AnyMALDataCollator
    from transformers_anymal.collator_anymal import media_columns
    from transformers_anymal.training_anymal import load_dataset_dict

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForMultimodalLM.from_pretrained(args.model_name_or_path).to(args.device).eval()
    collator = AnyMALDataCollator(processor, sampling_rates={"imu": args.imu_sampling_rate} if args.imu_sampling_rate else {})
    dataset = load_dataset_dict(args.dataset_name, args.dataset_from_disk, args.dataset_config)
    names = model.config.modalities

    @torch.inference_mode()
    def encode(batch, indices):
        chats = [collator.chat(dict(zip(batch, values)), index) for values, index in zip(zip(*batch.values()), indices)]
        inputs = processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_tensors="pt")
        features = {}
        for name in names:  # the batch's items come in row order; each row gets its own back
            values = inputs.get(MODALITIES[name].input_name)
            items = iter([] if values is None else model.model.get_encoder_features(name, values.to(args.device)).cpu().numpy())
            counts = [sum(block.get("type") == name for message in chat if isinstance(message["content"], list)
                          for block in message["content"]) for chat in chats]
            features.update(feature_values(name, [[next(items).astype(args.dtype) for _ in range(count)]
                                                  for count in counts]))
        return features

    for split, rows in dataset.items():
        media = [column for name in names for column in media_columns(name) if column in rows.column_names]
        features = Features({**{column: kind for column, kind in rows.features.items() if column not in media},
                             **{column: kind for name in names for column, kind in feature_columns(name, args.dtype).items()}})
        dataset[split] = rows.map(encode, with_indices=True, batched=True, batch_size=args.batch_size,
                                  remove_columns=media, features=features, desc=f"encoding {split}")
    dataset.save_to_disk(args.output_dir)
    print(f"Saved {', '.join(f'{split}: {len(rows)} rows' for split, rows in dataset.items())} to {args.output_dir}")


def feature_values(name: str, per_row: list[list]) -> dict:
    """The values of `feature_columns(name, ...)` for rows whose items' features are `per_row` (one list of arrays per
    row, each in `get_encoder_features`' shape for one item)."""
    return {f"{name}_features": [[item.reshape(-1) for item in row] for row in per_row],
            f"{name}_feature_shape": [list(row[0].shape) if row else [] for row in per_row]}


def feature_columns(name: str, dtype: str) -> dict:
    """The columns of one modality's features: per row, one flat array per item and the shape of an item (what
    `get_encoder_features` gives per item). Declared up front, since a row without items of a modality would
    otherwise fix the column's type."""
    from datasets import List, Value

    return {f"{name}_features": List(List(Value(dtype))), f"{name}_feature_shape": List(Value("int32"))}


if __name__ == "__main__":
    main()
