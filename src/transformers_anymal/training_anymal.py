"""What the training recipes share: SFT defaults for multimodal rows, model loading, and the PEFT set-ups of both
stages. Not part of the model's code, so checkpoints loaded with `trust_remote_code` never need it."""

import argparse
import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset, IterableDataset, load_from_disk
from peft import LNTuningConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForMultimodalLM, AutoProcessor
from transformers.trainer_utils import sort_checkpoints
from transformers.utils import logging
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_quantization_config

from .modeling_anymal import AnyMALForConditionalGeneration
from .streaming_anymal import STATE_FILE, StreamingSFTTrainer, dataset_builder, load_streaming_dataset
from .trainer_anymal import AnyMALSFTTrainer


logger = logging.get_logger(__name__)
# the Trainer's samplers that read each row's length, by the dataset they sample (evaluation: group_by_length only)
LENGTH_SAMPLERS = {"train_dataset": ("group_by_length", "batch_rebalance"), "eval_dataset": ("group_by_length",)}
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into each checkpoint
OPTIMIZER_STATE = {  # as the Trainer saves it: one file, FSDP's sharded folder, DeepSpeed's global_step folder
    "optimizer state (optimizer.pt)": ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*"),
    "scheduler state (scheduler.pt)": ("scheduler.pt",),
}


@dataclass
class AnyMALScriptArguments(ScriptArguments):
    """Dataset options of the AnyMAL recipes."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset or local path (load_dataset)."})
    dataset_from_disk: bool = field(default=False, metadata={"help": "Read dataset_name with load_from_disk."})
    imu_sampling_rate: int | None = field(default=None, metadata={"help": "Rate (Hz) of IMU columns that don't say."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream dataset_name (WebDataset .tar shards, parquet, chat rows) instead of loading it: each process "
                "reads its own shards, DataLoader workers decode (--dataloader_num_workers >= 1), checkpoints keep "
                "the stream's position; needs --max_steps."})
    stream_errors: str = field(default="skip", metadata={
        "help": "What a streamed sample that fails to decode does: `skip` (logged, counted in skipped_samples) or "
                "`raise` (stops the run).", "choices": ["skip", "raise"]})

    @property
    def sampling_rates(self) -> dict[str, int]:
        """The collator's rates of recordings whose rows don't say."""
        return {"imu": self.imu_sampling_rate} if self.imu_sampling_rate is not None else {}


@dataclass
class AnyMALSFTConfig(SFTConfig):
    """SFTConfig with the settings multimodal rows need."""

    max_length: int | None = field(default=None, metadata={"help": "None: truncation could cut a placeholder run."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator reads the media columns."})
    dataset_kwargs: dict | None = field(default_factory=lambda: {"skip_prepare_dataset": True},
                                        metadata={"help": "The collator tokenizes; TRL's preparation is skipped."})
    logging_steps: float = field(default=1, metadata={"help": "Log the loss every this many steps."})
    base_kl_weight: float = field(default=0.0, metadata={
        "help": "On text-only rows (no media), add this weight times the KL divergence from the language model "
                "without its LoRA adapters to the model being trained, over the answer tokens: the adapters learn the "
                "media without moving what the LLM says to text alone. Needs --use_peft. 0: off."})
    resume_without_optimizer_state: bool = field(default=False, metadata={
        "help": "Resume from a checkpoint that lacks the optimizer or scheduler state: they start afresh, so the run "
                "will not end where an uninterrupted one would."})


def parse_recipe_args(dataclasses: tuple, description: str, argv: list[str] | None = None) -> tuple:
    """TrlParser over `argv` (default: the command line), with `--config recipe.yaml` listed in `--help` (TrlParser
    reads it before parsing)."""
    parser = TrlParser(dataclasses, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of option values (command-line options override it)")
    return tuple(parser.parse_args_and_config(argv))[: len(dataclasses)]


def load_dataset_dict(name: str, from_disk: bool = False, config: str | None = None, streaming: bool = False):
    """The recipes' and scripts' datasets: `load_from_disk(name)`, or what `load_dataset(name, config)` gives (built
    from `dataset_builder`, so that a local folder reads its own files), with cached encoder features read as arrays
    (`features_as_arrays`); with `streaming`, `load_streaming_dataset(name, config)`."""
    if streaming:
        if from_disk:
            raise ValueError("--streaming reads files that `datasets` streams (WebDataset .tar, parquet, json); a "
                             "save_to_disk folder loads with --dataset_from_disk alone.")
        return load_streaming_dataset(name, config)
    if from_disk:
        return features_as_arrays(load_from_disk(name))
    builder = dataset_builder(name, config)
    builder.download_and_prepare()
    return features_as_arrays(builder.as_dataset())


def first_rows(dataset, count: int = 64):
    """The dataset itself, or for a stream its first `count` rows: what the recipes check before training."""
    return dataset.take(count) if isinstance(dataset, IterableDataset) else dataset


def features_as_arrays(dataset):
    """`dataset` (a Dataset or DatasetDict) with its cached encoder features (`<modality>_features` and
    `<modality>_feature_shape` columns, as `examples/cache_features.py` writes them) read as numpy arrays in their
    stored dtype; the other columns as they were. datasets' default Python format turns every number of them into a
    Python float (benchmarks/bench_feature_cache.py compares the two)."""
    if hasattr(dataset, "items"):
        return type(dataset)({split: features_as_arrays(rows) for split, rows in dataset.items()})
    columns = [column for column in dataset.column_names if column.endswith(("_features", "_feature_shape"))]
    if not columns:
        return dataset
    # dtype=None: as stored (datasets' numpy format would otherwise turn float16 into float32)
    return dataset.with_format("numpy", columns=columns, output_all_columns=True, dtype=None)


def load_base_model(model_args: ModelConfig, **kwargs) -> AnyMALForConditionalGeneration:
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    return AutoModelForMultimodalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, revision=model_args.model_revision, **kwargs
    )


def load_model_and_processor(model_args: ModelConfig) -> tuple[AnyMALForConditionalGeneration, AutoProcessor]:
    """The checkpoint with its language model quantized when `--load_in_4bit`/`--load_in_8bit` asks for it."""
    quantization_config = get_quantization_config(model_args)
    model = load_base_model(
        model_args,
        quantization_config=quantization_config,
        # each process keeps its whole quantized model on its own GPU
        device_map={"": PartialState().local_process_index} if quantization_config and torch.cuda.is_available() else None,
        attn_implementation=model_args.attn_implementation,
    )
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    return model, processor


def sft_trainer(model: nn.Module, peft_config: PeftConfig | None = None, stream_errors: str = "skip",
                **kwargs) -> SFTTrainer:
    """`AnyMALSFTTrainer(model=model, peft_config=peft_config, **kwargs)` whose trainable weights keep the precision
    they were loaded in when the language model is 4/8-bit; a `StreamingSFTTrainer` (rows that fail to decode:
    `stream_errors`) when the train dataset is streamed.

    There TRL 1.16 casts every trainable parameter to bf16, the QLoRA paper's choice for LoRA adapters. It starves
    the projectors: a resampler latent near 1.0 has a bf16 step of 0.0078, so Adam updates of about the learning
    rate (2e-4) round away. The PEFT model is built here and its trainable weights restored after TRL's cast.
    """
    args, collator = kwargs.get("args"), kwargs.get("data_collator")
    strategy = getattr(args, "train_sampling_strategy", "random")
    for split, samplers in LENGTH_SAMPLERS.items():
        if strategy in samplers and split in kwargs:
            kwargs[split] = with_sequence_lengths(kwargs[split], collator, args.length_column_name)
    trainer_class = AnyMALSFTTrainer
    if isinstance(kwargs.get("train_dataset"), IterableDataset):  # TRL turns accelerate's dispatch_batches off
        trainer_class = partial(StreamingSFTTrainer, on_error=stream_errors)
    if not getattr(model, "is_quantized", False):
        return trainer_class(model=model, peft_config=peft_config, **kwargs)
    if peft_config is not None:
        model = peft_model(model, peft_config)
    loaded = {name: parameter.detach().to("cpu", copy=True)  # off the GPU: the projectors of 70B hold 0.7B weights
              for name, parameter in model.named_parameters() if parameter.requires_grad}
    trainer = trainer_class(model=model, **kwargs)
    for name, parameter in trainer.model.named_parameters():
        if name in loaded and parameter.dtype != loaded[name].dtype:
            parameter.data = loaded[name].to(parameter.device)
    return trainer


def with_sequence_lengths(dataset, collator, column: str = "length"):
    """`dataset` with each row's token count (`AnyMALDataCollator.sequence_length`) in `column`, for the Trainer's
    length samplers (`--train_sampling_strategy group_by_length` or `batch_rebalance`), which read that column and
    without it look for `input_ids`, which chat rows do not have. Batches of rows of like length carry less padding.
    Returned as it is: a dataset that has the column already, has no chats (`messages`, or `prompt` + `completion`),
    is streamed, or goes to a collator that cannot count. A dataset with an indices mapping (after `shuffle`,
    `select`, `filter`) is written out anew, as `Dataset.add_column` does. A dict of datasets (evaluation sets) gets
    the column in each."""
    if isinstance(dataset, dict):
        return {name: with_sequence_lengths(rows, collator, column) for name, rows in dataset.items()}
    if not isinstance(dataset, Dataset) or column in dataset.column_names or not hasattr(collator, "sequence_length"):
        return dataset
    chats = next((names for names in (["messages"], ["prompt", "completion"])
                  if set(names) <= set(dataset.column_names)), None)
    if chats is None:
        return dataset
    lengths = [collator.sequence_length(row, index) for index, row in enumerate(tqdm(
        dataset.select_columns(chats), desc="Counting the tokens of each row (grouping batches by length)",
        disable=not PartialState().is_local_main_process))]
    return dataset.add_column(column, lengths)


def train(trainer, training_args) -> None:
    """`trainer.train()`, resuming from `--resume_from_checkpoint` (`last`: the newest complete checkpoint; a stream
    continues from the positions the checkpoint holds); in a distributed run, each rank then prints a digest of its
    trainable weights, which ranks in sync share, and a streaming one the samples it trained on and skipped."""
    streaming = isinstance(trainer, StreamingSFTTrainer)
    checkpoint = resume_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint,
                                   getattr(training_args, "resume_without_optimizer_state", False),
                                   also_needs=[STATE_FILE.format(rank=training_args.process_index)] if streaming else [])
    if streaming and checkpoint:
        trainer.resume_stream(checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    if streaming:
        print(f"rank {trainer.accelerator.process_index}: trained on {trainer.stream.samples} streamed samples, "
              f"skipped {trainer.stream.skipped} that failed to decode", flush=True)
    if trainer.accelerator.num_processes > 1:
        print(f"rank {trainer.accelerator.process_index}: digest of the trainable weights {checksum(trainer.model)} "
              "(the same on every rank when the ranks are in sync)", flush=True)


def resume_checkpoint(output_dir: str, resume: str | bool | None, without_optimizer_state: bool = False,
                      also_needs: list[str] = ()) -> str | None:
    """The checkpoint folder to resume from: `resume` itself, or for "last" the newest complete `checkpoint-N` in
    `output_dir`. The Trainer writes `trainer_state.json` last (and callbacks then add files such as `also_needs`),
    so a folder without them was cut short while being written (the run was killed): it is skipped, with a warning. A checkpoint without the optimizer's or scheduler's
    state is refused unless `without_optimizer_state`, since resuming from it changes the run's result."""
    if resume in (None, False, "", "False", "false"):
        return None
    if resume in (True, "last", "True", "true"):
        folders = [Path(folder) for folder in reversed(sort_checkpoints(output_dir))]  # the newest first
        needed = [TRAINER_STATE, *also_needs]
        complete = next((folder for folder in folders if all((folder / name).is_file() for name in needed)), None)
        for folder in folders[: folders.index(complete) if complete else None]:
            logger.warning(f"Skipping {folder}: it lacks {' or '.join(needed)}, which are written last, so the run "
                           "stopped while writing it. It is overwritten when training reaches that step again.")
        if complete is None:
            raise ValueError(f"--resume_from_checkpoint last: no complete checkpoint-N folder in {output_dir}"
                             f"{' (all were cut short)' if folders else ''}; start without the option.")
        logger.warning(f"Resuming from {complete}.")
        checkpoint = complete
    else:
        checkpoint = Path(resume)
        if not (checkpoint / TRAINER_STATE).is_file():
            raise ValueError(f"--resume_from_checkpoint {resume}: no {TRAINER_STATE} there; it is not a checkpoint "
                             "folder, or it was cut short while being written.")
    missing = [name for name, patterns in OPTIMIZER_STATE.items()
               if not any(any(checkpoint.glob(pattern)) for pattern in patterns)]
    if missing and not without_optimizer_state:
        raise ValueError(f"{checkpoint} has no {' and no '.join(missing)}: resuming would restart them and end "
                         "elsewhere than an uninterrupted run. Pass --resume_without_optimizer_state to resume anyway.")
    if missing:
        logger.warning(f"Resuming from {checkpoint} without its {' and '.join(missing)}: they start afresh.")
    return str(checkpoint)


def projector_tuning_config(model: AnyMALForConditionalGeneration) -> LNTuningConfig:
    """PEFT set-up of the alignment stage on a quantized LLM: the projectors train as whole modules, nothing else.

    The Trainer refuses to train a quantized model without PEFT adapters; PEFT's LN-tuning trains full copies of the
    modules it targets, which for the projectors is exactly the alignment stage, and merges them back.
    """
    return LNTuningConfig(target_modules=_projector_names(model))


@contextmanager
def _projectors_wrapped_whole():
    """Silences, inside the block only, PEFT's "Unsupported layer type" warning for each AnyMAL projector that
    LN-tuning wraps as a whole module, which is what the alignment stage wants."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type .*AnyMAL", category=UserWarning)
        yield


def peft_model(model: nn.Module, peft_config: PeftConfig):
    """`get_peft_model(model, peft_config)` without a warning per projector (see `_projectors_wrapped_whole`)."""
    with _projectors_wrapped_whole():
        return get_peft_model(model, peft_config)


def lora_config(model: AnyMALForConditionalGeneration, model_args: ModelConfig) -> LoraConfig:
    """LoRA on the language model's linear layers (not the encoders'): all of them, or those whose last name part is
    in `--lora_target_modules` (e.g. `q_proj v_proj`); the projectors train in full."""
    linear = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and ".language_model." in f".{name}"]
    wanted = model_args.lora_target_modules
    if wanted in (None, [], "all-linear", ["all-linear"]):
        targets = linear
    else:
        wanted = [wanted] if isinstance(wanted, str) else wanted
        targets = [name for name in linear if name.rsplit(".", 1)[-1] in wanted]
    if not targets:
        raise ValueError(f"--lora_target_modules {' '.join(wanted)} names none of the language model's linear layers; "
                         f"their names end in {sorted({name.rsplit('.', 1)[-1] for name in linear})}.")
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=_projector_names(model),
    )


def _projector_names(model) -> list[str]:
    return [f"model.projectors.{name}" for name in model.config.modalities]


def save_merged(model_args: ModelConfig, adapter_dir: str, output_dir: str, processor) -> None:
    """Applies the trained adapters to the full-precision base and writes a plain checkpoint."""
    with _projectors_wrapped_whole():
        merged = PeftModel.from_pretrained(load_base_model(model_args), adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def save_aligned(model_args: ModelConfig, trained: nn.Module, output_dir: str, processor):
    """Stage 1's result from a run on a quantized LLM: the full-precision base with the trained projectors,
    saved and returned."""
    base = load_base_model(model_args)
    for name, projector in trained.get_base_model().model.projectors.items():
        # the trained copy PEFT kept next to the original; load_state_dict casts it to the base's dtype
        base.model.projectors[name].load_state_dict(projector.ln_tuning_layers["default"].state_dict())
    base.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return base


def checksum(model: nn.Module) -> str:
    """A short digest of the trainable weights, to compare ranks or runs."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


