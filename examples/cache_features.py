"""Runs the frozen encoders over a dataset once and stores their outputs as parquet shards, so alignment trains
without them.

    python examples/cache_features.py --model_name_or_path anymal-7b-init --dataset_name my/captions \\
        --output_dir my-captions-features [--imu_sampling_rate 100] [--dtype bfloat16] [--streaming]
    accelerate launch --num_processes 8 examples/cache_features.py ...  # 8 ranks, each writing shards of its own
    accelerate launch examples/align.py --model_name_or_path anymal-7b-init --dataset_name my-captions-features \\
        --output_dir anymal-7b-aligned [--streaming]

<output_dir> is a dataset that `load_dataset` reads, whole or streamed: per split a folder of parquet shards
(`<split>/<rank>-<n>.parquet`, about --shard_size rows each), a README.md whose `configs` name the splits, and
manifest.json (the encoders' checkpoint, digests of their configs and weights, the dtype, a digest of each split's
rows, rows and shards per split, samples skipped). Each row keeps its chat and gets a `<modality>_features` column
(one flat array per item, in block order) and a `<modality>_feature_shape` column (one item's shape) in place of its
media columns; AnyMALDataCollator then passes them to the model as `encoder_features`. Features are what the
encoders give before the projectors, so the projectors still train. Items are stored flat because datasets converts
nested lists to numpy element by element (about 70 ViT-L items/s per core here) and flat ones whole (over 2,000/s).

A shard is written whole and then renamed into place, and each rank records the shards it finished (with, when
streaming, where each DataLoader worker's stream stood), so the same command after a crash goes on from the next
shard without encoding the finished ones again. A folder that holds features of other encoders (checkpoint, configs
or weights), another dtype or other rows is refused rather than added to. Media decode in DataLoader workers
(--num_workers; streaming needs at least 1). A sample that fails to decode is skipped and counted in the manifest
(--stream_errors raise: stop).
"""

import argparse
import hashlib
import json
import os
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="AnyMAL checkpoint whose encoders to run")
    parser.add_argument("--dataset_name", required=True, help="Hub dataset or local path")
    parser.add_argument("--dataset_from_disk", action="store_true", help="read dataset_name with load_from_disk")
    parser.add_argument("--dataset_config", help="dataset configuration name")
    parser.add_argument("--streaming", action="store_true",
                        help="stream dataset_name (WebDataset .tar shards, parquet, ...) instead of loading it")
    parser.add_argument("--output_dir", required=True, help="where the parquet shards and manifest.json go")
    parser.add_argument("--imu_sampling_rate", type=int, help="rate (Hz) of IMU columns that don't say")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="precision the features are stored in (bfloat16 as its 16-bit patterns, uint16 columns: "
                             "parquet has no bfloat16 type; the collator turns them back)")
    parser.add_argument("--batch_size", type=int, default=32, help="rows encoded together")
    parser.add_argument("--shard_size", type=int, default=1024, help="rows per parquet shard (whole batches)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers that read and decode media")
    parser.add_argument("--stream_errors", default="skip", choices=["skip", "raise"],
                        help="a sample that fails to decode: skip it (counted in the manifest) or stop")
    parser.add_argument("--device", help="where the model runs (default: this process's GPU when there is one, else cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    import torch  # after parsing, so that --help answers at once
    from accelerate import PartialState
    from datasets import Features, Value
    from datasets.distributed import split_dataset_by_node
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    from transformers_anymal import AnyMALDataCollator
    from transformers_anymal.collator_anymal import media_columns
    from transformers_anymal.streaming_anymal import STREAM_STATE, StartFrom, StreamCollator
    from transformers_anymal.training_anymal import load_dataset_dict

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())  # gloo between CPU ranks
    args.device = args.device or str(state.device)
    if args.streaming and args.num_workers < 1:
        raise ValueError("Streaming decodes media in DataLoader workers: pass --num_workers 1 (or more).")
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForMultimodalLM.from_pretrained(args.model_name_or_path).to(args.device).eval()
    names = model.config.modalities
    collator = AnyMALDataCollator(processor, sampling_rates={"imu": args.imu_sampling_rate} if args.imu_sampling_rate else {})
    dataset = load_dataset_dict(args.dataset_name, args.dataset_from_disk, args.dataset_config, args.streaming)
    output = Path(args.output_dir)
    identity = None
    if state.is_main_process:
        identity = {"encoders": args.model_name_or_path, "config_hash": encoder_config_hash(model),
                    "encoder_weights": encoder_weights_digest(model), "dtype": args.dtype,
                    # a stream is not read ahead: its rows are known by the shards' positions alone
                    "rows": None if args.streaming else {split: rows_digest(rows) for split, rows in dataset.items()}}
        check_identity(output, identity)
    state.wait_for_everyone()

    for split, rows in dataset.items():
        media = {column for name in names for column in media_columns(name)} | {"messages", "prompt", "completion"}
        kept = ({column: kind for column, kind in rows.features.items() if column not in media} if rows.features
                else {"__key__": Value("string"), "__url__": Value("string")})  # a WebDataset stream's sample names
        features = Features({"messages": chat_column(), **kept, **{
            column: kind for name in names for column, kind in feature_columns(name, args.dtype).items()}})
        folder = output / split
        folder.mkdir(parents=True, exist_ok=True)
        progress = Progress(folder / f"progress-{state.process_index:05d}.json")
        if args.streaming:
            rows = split_dataset_by_node(rows, rank=state.process_index, world_size=state.num_processes)
        else:
            rows = rows.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
            rows = rows.select(range(progress.consumed, len(rows)) if progress.consumed < len(rows) else [])
        loader = DataLoader(rows, batch_size=args.batch_size, num_workers=args.num_workers,
                            collate_fn=StreamCollator(ChatsToInputs(collator, processor, names, media), args.stream_errors),
                            worker_init_fn=StartFrom(progress.positions) if args.streaming else None)
        bar = tqdm(total=None if args.streaming else len(rows), unit="sample", disable=not state.is_local_main_process,
                   desc=f"encoding {split}" + (f" (rank {state.process_index} of {state.num_processes})"
                                               if state.num_processes > 1 else ""))
        records, positions, skipped = [], dict(progress.positions), []
        with torch.inference_mode():
            for batch in loader:
                stream = batch.pop(STREAM_STATE)
                positions[str(stream["worker"])] = stream["state"]
                skipped += stream["skipped"]
                for row in stream["skipped"]:
                    print(f"skipped sample {row['key']!r} of {row['shard']}: {row['error']}", flush=True)
                records += encode(model, batch, names, args.dtype, args.device)
                bar.update(stream["rows"] + len(stream["skipped"]))
                if len(records) >= args.shard_size:
                    progress.add(write_shard(folder, state.process_index, len(progress.shards), records, features),
                                 len(records), positions, skipped)
                    records, skipped = [], []
            if records or skipped:
                progress.add(write_shard(folder, state.process_index, len(progress.shards), records, features),
                             len(records), positions, skipped)
        bar.close()

    state.wait_for_everyone()
    if state.is_main_process:
        manifest = write_manifest(output, identity, list(dataset))
        written = [f"{split}: {info['rows']} rows in {len(info['shards'])} shard(s), {info['skipped']} skipped"
                   for split, info in manifest["splits"].items()]
        print(f"Saved {'; '.join(written)} to {args.output_dir}")


class ChatsToInputs:
    """Collate function of the encoding DataLoader: rows to the processor's inputs (media decoded here, in a worker),
    the rows' other columns, and each row's item count per modality."""

    def __init__(self, collator, processor, names: list[str], media: set[str]):
        self.collator, self.processor, self.names, self.media = collator, processor, names, media

    def __call__(self, rows: list[dict]) -> dict:
        from transformers_anymal.collator_anymal import bare_chat

        chats = [self.collator.chat(row, index) for index, row in enumerate(rows)]
        inputs = self.processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_tensors="pt")
        counts = {name: [sum(block.get("type") == name for message in chat if isinstance(message["content"], list)
                             for block in message["content"]) for chat in chats] for name in self.names}
        columns = [{"messages": bare_chat(chat), **{column: value for column, value in row.items()
                                                    if column not in self.media}} for row, chat in zip(rows, chats)]
        return {"inputs": dict(inputs), "counts": counts, "rows": columns}


def encode(model, batch: dict, names: list[str], dtype: str, device: str) -> list[dict]:
    """The batch's rows, each with its items' encoder features in `feature_columns`' layout."""
    from transformers_anymal import MODALITIES

    rows = batch["rows"]
    for name in names:  # the batch's items come in row order; each row gets its own back
        media = batch["inputs"].get(MODALITIES[name].input_name)
        items = iter([] if media is None else stored(model.model.get_encoder_features(name, media.to(device)), dtype))
        per_row = [[next(items) for _ in range(count)] for count in batch["counts"][name]]
        for column, per_row_values in feature_values(name, per_row).items():
            for row, value in zip(rows, per_row_values):
                row[column] = value
    return rows


def stored(features, dtype: str):
    """Encoder features as the cache stores them: a numpy array of `dtype`, bfloat16 as its bit patterns (uint16)."""
    import torch

    from transformers_anymal.processing_anymal import BFLOAT16_BITS

    if dtype == "bfloat16":
        return features.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(BFLOAT16_BITS)
    return features.detach().cpu().numpy().astype(dtype)


def write_shard(folder: Path, rank: int, index: int, records: list[dict], features) -> str:
    """Writes `records` as the parquet shard `<rank>-<index>.parquet`: whole, then renamed into place."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    name = f"{rank:05d}-{index:05d}.parquet"
    partial = folder / f".{name}.partial"
    records = [{column: row.get(column) for column in features} for row in records]  # e.g. no IMU sampling rates
    pq.write_table(Dataset.from_list(records, features=features).data.table, partial)  # with the features' types
    os.replace(partial, folder / name)
    return name


class Progress:
    """One rank's finished shards of a split, with the rows in them, the samples skipped (counted, the first
    `SKIPPED_EXAMPLES` named) and the stream positions after them; rewritten whole (then renamed) after each shard."""

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.shards: dict[str, int] = saved.get("shards", {})
        self.positions: dict[str, dict] = saved.get("positions", {})
        self.skipped: int = saved.get("skipped", 0)
        self.skipped_examples: list[dict] = saved.get("skipped_examples", [])
        if self.shards:
            print(f"{path.parent.name}: {len(self.shards)} shard(s) of {self.rows} rows already written; going on "
                  "from there", flush=True)

    @property
    def rows(self) -> int:
        return sum(self.shards.values())

    @property
    def consumed(self) -> int:
        """Rows of the rank's input done: written or skipped."""
        return self.rows + self.skipped

    def add(self, shard: str, rows: int, positions: dict, skipped: list[dict]) -> None:
        from transformers_anymal.streaming_anymal import SKIPPED_EXAMPLES

        self.shards[shard], self.positions, self.skipped = rows, dict(positions), self.skipped + len(skipped)
        self.skipped_examples = (self.skipped_examples + skipped)[:SKIPPED_EXAMPLES]
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"shards": self.shards, "positions": self.positions, "skipped": self.skipped,
                                       "skipped_examples": self.skipped_examples}))
        os.replace(partial, self.path)


def encoder_config_hash(model) -> str:
    """A digest of what decides the features: the encoders' configs and the modality settings (not the projectors)."""
    config = model.config.to_dict()
    encoders = {key: value for key, value in sorted(config.items())
                if key.endswith("_config") and key != "text_config"}
    return hashlib.sha256(json.dumps(encoders, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encoder_weights_digest(model) -> str:
    """A digest of the encoders' weights (names and bytes): two checkpoints of the same configs, trained apart, differ."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.encoders.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def rows_digest(rows) -> str:
    """A digest of a loaded split's rows, media included: its Arrow table's schema and buffers, in row order."""
    digest = hashlib.sha256()
    table = rows.data.table
    digest.update(str(table.schema).encode())
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
    return f"{len(rows)} rows, {digest.hexdigest()[:16]}"


IDENTITY_FIELDS = {"encoders": "the encoders' checkpoint", "config_hash": "the encoders' configs",
                   "encoder_weights": "the encoders' weights", "dtype": "the dtype", "rows": "the dataset's rows"}


def check_identity(output: Path, identity: dict) -> None:
    """Records what the cache holds in `identity.json`, or refuses to add shards to a cache of other encoders (their
    checkpoint, configs or weights), another dtype or other rows: going on from its shards would mix features of two
    runs in one dataset."""
    path = output / "identity.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [field for field in IDENTITY_FIELDS if saved.get(field) != identity[field]]
        if differ:
            said = "; ".join(f"{IDENTITY_FIELDS[field]}: "
                             f"{saved[field] if field in saved else 'not recorded (an older cache_features.py)'} there, "
                             f"{identity[field]} now" for field in differ)
            raise ValueError(f"{output} holds features of another run ({said}); adding to it would mix the two. "
                             f"Use another --output_dir, or delete {output} to encode again.")
    elif any(output.glob("*/*.parquet")):
        raise ValueError(f"{output} holds parquet shards but no identity.json, so not a cache of this script's; "
                         "use another --output_dir.")
    else:
        output.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity))


def write_manifest(output: Path, identity: dict, splits: list[str]) -> dict:
    """manifest.json from every rank's progress, and the README.md whose `configs` let `load_dataset` find the splits."""
    manifest = {**identity, "splits": {}}
    for split in splits:
        shards, skipped, examples = {}, 0, []
        for path in sorted((output / split).glob("progress-*.json")):
            saved = json.loads(path.read_text())
            shards.update(saved["shards"])
            skipped, examples = skipped + saved["skipped"], examples + saved["skipped_examples"]
        manifest["splits"][split] = {"rows": sum(shards.values()), "shards": dict(sorted(shards.items())),
                                     "skipped": skipped, "skipped_examples": examples}
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    data_files = "".join(f"  - split: {split}\n    path: {split}/*.parquet\n" for split in splits)
    (output / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{data_files}---\n\n"
                                      f"Encoder features of {identity['encoders']}, written by "
                                      "transformers-anymal's examples/cache_features.py; see manifest.json.\n")
    return manifest


def feature_values(name: str, per_row: list[list]) -> dict:
    """The values of `feature_columns(name, ...)` for rows whose items' features are `per_row` (one list of arrays per
    row, each in `get_encoder_features`' shape for one item)."""
    return {f"{name}_features": [[item.reshape(-1) for item in row] for row in per_row],
            f"{name}_feature_shape": [list(row[0].shape) if row else [] for row in per_row]}


def chat_column():
    """The type of cached rows' `messages`: every content a list of blocks, media blocks bare (`bare_chat`)."""
    from datasets import List, Value

    return List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})


def feature_columns(name: str, dtype: str) -> dict:
    """The columns of one modality's features: per row, one flat array per item and the shape of an item (what
    `get_encoder_features` gives per item). Declared up front, since a row without items of a modality would
    otherwise fix the column's type."""
    from datasets import List, Value

    stored_as = "uint16" if dtype == "bfloat16" else dtype  # bfloat16 bit patterns (`stored`)
    return {f"{name}_features": List(List(Value(stored_as))), f"{name}_feature_shape": List(Value("int32"))}


if __name__ == "__main__":
    main()
