"""Stage 1 of AnyMAL, modality alignment: only the projectors train, on paired media-caption data, while the
language model (optionally 4-bit or 8-bit, as the paper does for 70B on one GPU) and the encoders stay frozen.

    accelerate launch examples/align.py --model_name_or_path anymal-70b-init --dataset_name my/captions \\
        --output_dir anymal-70b-aligned --load_in_4bit

Rows are chats as for examples/sft.py, e.g. a user turn with {"type": "image"} and an assistant turn with the
caption; with --streaming, WebDataset shards of media and captions (as img2dataset writes them) or a feature cache
of examples/cache_features.py work too, each process reading shards of its own (README: "Streaming at scale"). <output_dir> ends up a full checkpoint, what examples/sft.py starts from: with a quantized language model
the projectors train as PEFT modules (checkpoints hold only them, which resume reads) and are then written into the
full-precision base.
"""

from trl import ModelConfig

from transformers_anymal import AnyMALDataCollator
from transformers_anymal.training_anymal import (
    AnyMALScriptArguments,
    AnyMALSFTConfig,
    first_rows,
    load_dataset_dict,
    load_model_and_processor,
    parse_recipe_args,
    projector_tuning_config,
    save_aligned,
    sft_trainer,
    train,
)


def main(script_args, training_args, model_args):
    model, processor = load_model_and_processor(model_args)
    counts = model.set_trainable(language_model=False, encoders=False, projectors=True)
    print(f"trainable parameters by part: {counts}")
    quantized = getattr(model, "is_quantized", False)
    push_to_hub = training_args.push_to_hub
    if quantized:  # the Trainer would push PEFT's projector copies; the full-precision result is pushed at the end
        training_args.push_to_hub = False

    dataset = load_dataset_dict(script_args.dataset_name, script_args.dataset_from_disk, script_args.dataset_config,
                                script_args.streaming)
    collator = AnyMALDataCollator(processor, sampling_rates=script_args.sampling_rates)
    collator.check_dataset(first_rows(dataset[script_args.dataset_train_split]), model.config.modalities,
                           name="train split")

    trainer = sft_trainer(
        model,
        peft_config=projector_tuning_config(model) if quantized else None,  # the Trainer wants PEFT on 4/8-bit
        args=training_args,
        data_collator=collator,
        train_dataset=dataset[script_args.dataset_train_split],
        processing_class=processor,
        stream_errors=script_args.stream_errors,
    )
    train(trainer, training_args)
    if not quantized:
        trainer.save_model(training_args.output_dir)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
    elif trainer.accelerator.is_main_process:  # the full-precision base with the trained projectors, not PEFT's copies
        aligned = save_aligned(model_args, trainer.model, training_args.output_dir, processor)
        if push_to_hub:
            repo_id = training_args.hub_model_id or training_args.output_dir.rstrip("/").split("/")[-1]
            aligned.push_to_hub(repo_id, datasets=[script_args.dataset_name], training_stages=["alignment: projectors"])
            processor.push_to_hub(repo_id)


def cli(argv: list[str] | None = None):
    main(*parse_recipe_args((AnyMALScriptArguments, AnyMALSFTConfig, ModelConfig), __doc__, argv))


if __name__ == "__main__":
    cli()
