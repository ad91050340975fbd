"""Streaming training data: datasets that `datasets` streams (WebDataset `.tar` shards of media and captions, parquet,
chat rows), read shard by shard on each rank, media decoded in DataLoader workers, and the stream's position carried
with every batch, so that a checkpoint holds where each worker stood and a killed run resumes at the same sample.
Not part of the model's code, so checkpoints loaded with `trust_remote_code` never need it."""

import json
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from datasets import Features, IterableDatasetDict, Value, load_dataset_builder
from datasets.data_files import DataFilesList
from datasets.features import Audio, Image, Video
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .trainer_anymal import AnyMALSFTTrainer


logger = logging.get_logger(__name__)

# WebDataset file extensions of each modality's item, as img2dataset and friends write them
MEDIA_EXTENSIONS = {
    "image": ("jpg", "jpeg", "png", "webp"),
    "video": ("mp4", "webm", "mkv", "mov", "avi"),
    "audio": ("flac", "wav", "mp3", "ogg"),
    "imu": ("npy",),
}
CAPTION_FIELDS = ("txt", "caption", "text")  # a sample's caption file, or these keys of its .json
STREAM_STATE = "stream_state"  # the batch key that carries the stream's position, popped before the model sees it
STATE_FILE = "stream_state_rank{rank}.json"  # in each checkpoint folder, one per rank
SKIPPED_EXAMPLES = 100  # skipped samples named in checkpoints and manifests (all are counted, and logged as skipped)


def load_streaming_dataset(name: str, config: str | None = None) -> IterableDatasetDict:
    """`load_dataset(name, config, streaming=True)`, with WebDataset samples turned into chat rows
    (`webdataset_row`). Media stay undecoded bytes until the collator reads them, in a DataLoader worker. Cached
    encoder features (`examples/cache_features.py`) come as numpy arrays (`features_as_arrays`). Local WebDataset
    shards cut short (a copy or download that stopped) are left out, each named in a warning (`complete_shards`)."""
    builder = dataset_builder(name, config)  # resolves the files once (a Hub dataset: one listing)
    dataset = builder.as_streaming_dataset()  # a WebDataset's features are inferred here, from its first samples
    first = next(iter(dataset.values()))
    if first.features is not None and any(column.endswith("_features") for column in first.features):
        return IterableDatasetDict({split: features_as_arrays(rows) for split, rows in dataset.items()})
    if first.info.builder_name != "webdataset":
        return dataset
    # datasets encodes Audio and Video values of WebDataset samples (which needs torchcodec) before anything reads
    # them; read as plain bytes, the collator decodes them with the project's own readers
    builder.info.features = Features({column: Value("binary") if isinstance(kind, (Audio, Video, Image)) else kind
                                      for column, kind in first.features.items()})
    for split, files in builder.config.data_files.items():
        if len(complete := complete_shards(files)) < len(files):
            origins = files.origin_metadata if len(files.origin_metadata) == len(files) else [None] * len(files)
            builder.config.data_files[split] = DataFilesList(
                complete, [origin for file, origin in zip(files, origins) if file in complete])
    dataset = builder.as_streaming_dataset()  # the same files, less those cut short, with media as bytes
    return IterableDatasetDict({split: rows.map(webdataset_row, remove_columns=list(rows.features))
                                for split, rows in dataset.items()})


def dataset_builder(name, config: str | None = None):
    """`load_dataset_builder(name, config)`, and for a local folder the builder of the files it resolves to.

    datasets (5.2) keys what it caches of a folder whose README.md lists `configs` (as `export_webdataset.py` and
    `cache_features.py` write) by the folder's name alone, not its files: a second folder of the same name (another
    run's `features`) would read the first one's cached copy, or its cached schema. Keyed by its files (paths and
    modification times), each folder reads its own data."""
    builder = load_dataset_builder(str(name), config)
    if Path(name).is_dir():
        builder = load_dataset_builder(builder.info.builder_name, data_files=builder.config.data_files)
    return builder


def complete_shards(files: list[str]) -> list[str]:
    """The `.tar` shards among `files` that hold every member whole; local shards cut short are left out with a
    warning, since reading one stops the whole stream at the cut. Remote files are kept as they are.

    A shard that ends with a tar archive's end marker (two zero blocks) is whole, which one read of its last 1 KiB
    tells; only the others (a cut, or an archive written without the marker) have their member headers read."""
    complete = []
    for file in files:
        path = Path(file)
        if path.suffix != ".tar" or not path.is_file() or ends_with_end_marker(path):
            complete.append(file)
            continue
        try:
            with tarfile.open(path) as tar:  # reads each member's header, seeking over its data
                end = max((member.offset_data + member.size for member in tar), default=0)
            if end > path.stat().st_size:
                raise tarfile.ReadError(f"its last member ends at byte {end}, after the file's {path.stat().st_size}")
            complete.append(file)
        except (tarfile.TarError, EOFError) as error:
            logger.warning(f"Leaving out the WebDataset shard {file}: it is cut short ({error}).")
    if files and not complete:
        raise ValueError(f"every WebDataset shard of the split is cut short, e.g. {files[0]}.")
    return complete


def ends_with_end_marker(path: Path) -> bool:
    """Whether the file's last 1 KiB is zeros: a tar archive's end-of-archive marker, written after its last member."""
    size = path.stat().st_size
    if size < 2 * tarfile.BLOCKSIZE or size % tarfile.BLOCKSIZE:
        return False
    with open(path, "rb") as file:
        file.seek(size - 2 * tarfile.BLOCKSIZE)
        return not any(file.read(2 * tarfile.BLOCKSIZE))


def features_as_arrays(rows):
    """A stream of cached rows whose features come as numpy arrays in their stored dtype (read from Arrow whole, not
    number by number; datasets' numpy format for streams gives float32, which is turned back) and whose other
    columns stay Python values."""
    stored = {column: _innermost(kind).dtype for column, kind in (rows.features or {}).items()
              if column.endswith("_features")}
    return rows.with_format("numpy").map(partial(_python_values, stored=stored)).with_format(None)


def _innermost(feature):
    while hasattr(feature, "feature"):  # List(List(Value(dtype)))
        feature = feature.feature
    return feature


def _python_values(row: dict, stored: dict[str, str]) -> dict:
    return {column: _as_dtype(value, stored[column]) if column in stored else
            value if column.endswith("_feature_shape") else _python(value) for column, value in row.items()}


def _as_dtype(value, dtype: str):
    if isinstance(value, np.ndarray) and value.dtype == object:  # items of different lengths
        return [_as_dtype(item, dtype) for item in value]
    return value.astype(dtype, copy=False) if isinstance(value, np.ndarray) else value


def _python(value):
    """A value of datasets' numpy format as the Python format gives it (object arrays to lists, numpy scalars to
    Python ones)."""
    if isinstance(value, dict):
        return {key: _python(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return [_python(item) for item in value] if value.dtype == object else value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def webdataset_row(sample: dict) -> dict:
    """One WebDataset sample as a chat row for AnyMALDataCollator.

    Media files by extension (`MEDIA_EXTENSIONS`) become the row's `image`/`video`/`audio`/`imu` items. A `.json`
    with `messages` gives the chat, whose bare media blocks take those items; otherwise the caption (`.txt`, or
    `caption`/`text` in the `.json`) is the assistant's answer to a user turn of the sample's media, the alignment
    stage's captioning task. `<modality>_sampling_rate` in the `.json` (IMU recordings do not carry theirs) is kept.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    meta = sample.get("json") or {}
    row = {"__key__": key, "__url__": url}
    for name, extensions in MEDIA_EXTENSIONS.items():
        extension = next((extension for extension in extensions if sample.get(extension) is not None), None)
        if extension is None:
            row[name] = None
        elif isinstance(sample[extension], bytes):  # as datasets' media features give undecoded files
            row[name] = {"bytes": sample[extension], "path": None}
        else:  # .npy, which datasets decodes itself
            row[name] = sample[extension]
        if f"{name}_sampling_rate" in meta:
            row[f"{name}_sampling_rate"] = meta[f"{name}_sampling_rate"]
    if meta.get("messages") is not None:  # datasets gives every sample's .json the keys of all of them
        row["messages"] = meta["messages"]
        return row
    caption = next((value for source in (sample, meta) for field in CAPTION_FIELDS
                    if isinstance(value := source.get(field), str)), None)
    if caption is None:
        raise ValueError(f"sample {key!r} of {url}: no caption (a .txt file, or 'caption' in its .json) and no "
                         "'messages' in its .json; each sample needs one.")
    blocks = [{"type": name} for name in MEDIA_EXTENSIONS if row[name] is not None]
    row["messages"] = [{"role": "user", "content": blocks},
                       {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
    return row


@dataclass
class StreamCollator:
    """Collates a batch of rows with `collator` and adds under `STREAM_STATE` the rows it skipped and, in a DataLoader
    worker over a streamed dataset, where the worker's stream stands after them (`IterableDataset.state_dict()`).

    A row that fails to collate (a corrupt image, a truncated recording, a chat that disagrees with its media) is
    skipped when `on_error="skip"`, and named in the batch's `skipped` list; with `"raise"` the run stops on it,
    naming the batch's samples.
    """

    collator: object
    on_error: str = "skip"

    def __call__(self, rows: list[dict]) -> dict:
        try:
            batch, skipped = self.collator(rows), []
        except Exception as error:
            if self.on_error != "skip":
                samples = ", ".join(f"{row.get('__key__')!r} of {row.get('__url__')}" for row in rows)
                raise ValueError(f"A batch of streamed samples failed to decode ({samples}): {error} "
                                 "(--stream_errors skip skips the samples that fail)") from error
            batch, rows, skipped = self._without_bad_rows(rows)
        worker = torch.utils.data.get_worker_info()
        stream = worker.dataset if worker is not None and hasattr(worker.dataset, "state_dict") else None
        return {**batch, STREAM_STATE: {"worker": worker.id if worker else 0, "rows": len(rows), "skipped": skipped,
                                        "state": stream.state_dict() if stream is not None else None}}

    def _without_bad_rows(self, rows: list[dict]) -> tuple[dict, list[dict], list[dict]]:
        good, skipped = [], []
        for row in rows:
            try:
                self.collator([row])
                good.append(row)
            except Exception as error:
                skipped.append({"key": row.get("__key__"), "shard": row.get("__url__"),
                                "error": "".join(traceback.format_exception_only(error)).strip()})
        if not good:
            raise ValueError(f"every row of a batch failed to collate, e.g. {skipped[0]}: a fault of the data as a "
                             "whole, not of a few samples.")
        return self.collator(good), good, skipped


class StreamPositionCallback(TrainerCallback):
    """Keeps what the batches trained on so far say about the stream (each worker's position, samples trained on,
    samples skipped) and writes it into every checkpoint, as `stream_state_rank<r>.json`."""

    def __init__(self):
        self.positions: dict[int, dict] = {}  # DataLoader worker -> its stream's state_dict after its last batch
        self.samples = 0
        self.skipped = 0
        self.skipped_examples: list[dict] = []  # the first SKIPPED_EXAMPLES of them

    def record(self, stream_state: dict) -> None:
        self.positions[stream_state["worker"]] = stream_state["state"]
        self.samples += stream_state["rows"]
        for row in stream_state["skipped"]:
            logger.warning(f"Skipped sample {row['key']!r} of {row['shard']}: {row['error']}")
        self.skipped += len(stream_state["skipped"])
        self.skipped_examples = (self.skipped_examples + stream_state["skipped"])[:SKIPPED_EXAMPLES]

    def state(self, num_workers: int) -> dict:
        return {"num_workers": num_workers, "positions": {str(worker): state for worker, state in self.positions.items()},
                "samples": self.samples, "skipped": self.skipped, "skipped_examples": self.skipped_examples}

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        (folder / STATE_FILE.format(rank=args.process_index)).write_text(json.dumps(self.state(args.dataloader_num_workers)))


def saved_stream_state(checkpoint: str, rank: int, num_workers: int) -> dict:
    """The stream state rank `rank` saved in `checkpoint`, checked against this run's DataLoader workers."""
    path = Path(checkpoint) / STATE_FILE.format(rank=rank)
    if not path.is_file():
        raise ValueError(f"{checkpoint} has no {path.name}: it was not written by a streaming run of this many "
                         "processes, so where its stream stood is unknown. Resume it without --streaming, or with as "
                         "many processes as wrote it.")
    saved = json.loads(path.read_text())
    if saved["num_workers"] != num_workers:
        raise ValueError(f"{checkpoint} holds the stream positions of {saved['num_workers']} DataLoader workers per "
                         f"process; resume with --dataloader_num_workers {saved['num_workers']} (got {num_workers}).")
    return saved


@dataclass
class StartFrom:
    """`worker_init_fn` of a resumed stream: each DataLoader worker continues from the position it had reached."""

    positions: dict[str, dict] = field(default_factory=dict)

    def __call__(self, worker_id: int) -> None:
        position = self.positions.get(str(worker_id))
        if position is None:  # the worker had not delivered a batch yet
            return
        dataset = torch.utils.data.get_worker_info().dataset
        if dataset.epoch == 0:  # the first pass after resuming; later passes start at their beginning
            dataset.set_epoch(position["epoch"])
            dataset.load_state_dict(position)


class StreamingSFTTrainer(AnyMALSFTTrainer):
    """SFTTrainer over a streamed `datasets.IterableDataset`: each process reads its own shards (accelerate gives
    process i of N the i-th N-th of the shards), DataLoader workers read and decode, every batch says where its
    worker's stream stands, checkpoints keep it, and `resume_stream` continues from it instead of re-reading the
    batches already trained on. Rows that fail to decode are skipped and counted (`on_error="skip"`) or stop the run
    (`"raise"`). Logs add `samples_per_second` and, once any is skipped, `skipped_samples`, both this process's (the
    main process logs them)."""

    def __init__(self, *args, on_error: str = "skip", **kwargs):
        super().__init__(*args, **kwargs)
        self.on_error = on_error
        self.stream = StreamPositionCallback()
        self.add_callback(self.stream)
        self.resume_positions: dict[str, dict] = {}
        self._logged = (0, time.perf_counter())  # samples and time at the previous log

    def get_train_dataloader(self) -> DataLoader:
        dataset, processes = self.train_dataset, self.accelerator.num_processes
        if self.args.dataloader_num_workers < 1:
            raise ValueError("Streaming decodes media in DataLoader workers: pass --dataloader_num_workers 1 (or more).")
        if processes > 1 and dataset.num_shards < processes:
            raise ValueError(f"The streamed dataset has {dataset.num_shards} shard(s) for {processes} processes; each "
                             f"process reads shards of its own, so write at least {processes} shards.")
        loader = DataLoader(
            dataset, batch_size=self.args.train_batch_size, collate_fn=StreamCollator(self.data_collator, self.on_error),
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor, worker_init_fn=StartFrom(self.resume_positions),
        )
        return self.accelerator.prepare(loader)  # with dispatch_batches off: this process's shards of the dataset

    def resume_stream(self, checkpoint: str) -> None:
        """Continue the stream where `checkpoint` left it (call before `train(resume_from_checkpoint=checkpoint)`)."""
        saved = saved_stream_state(checkpoint, self.args.process_index, self.args.dataloader_num_workers)
        self.resume_positions.update(saved["positions"])
        self.stream.positions = {int(worker): state for worker, state in saved["positions"].items()}
        self.stream.samples, self.stream.skipped = saved["samples"], saved["skipped"]
        self.stream.skipped_examples = saved["skipped_examples"]
        self._logged = (self.stream.samples, time.perf_counter())
        self.args.ignore_data_skip = True  # the positions replace the Trainer's re-reading of trained batches

    def training_step(self, model, inputs, *args, **kwargs):
        self.stream.record(inputs.pop(STREAM_STATE))
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training step's log
            samples, now = self.stream.samples, time.perf_counter()
            logs["samples_per_second"] = round((samples - self._logged[0]) / (now - self._logged[1]), 3)
            self._logged = (samples, now)
            if self.stream.skipped:
                logs["skipped_samples"] = self.stream.skipped
        super().log(logs, start_time)


__all__ = ["StreamingSFTTrainer", "dataset_builder", "load_streaming_dataset", "webdataset_row"]
