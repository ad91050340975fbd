"""Stage 2 of AnyMAL, multimodal instruction tuning: LoRA on the language model (QLoRA when it is loaded in 4-bit),
the projectors trained in full, encoders frozen.

    accelerate launch examples/sft.py --model_name_or_path anymal-aligned --dataset_name my/mm-instructions \\
        --output_dir anymal-sft [--load_in_4bit] [--merge] [--push_to_hub] [--streaming --max_steps N]
    accelerate launch examples/sft.py  # no options: the whole recipe at toy scale on bundled data (anymal_demo/)
    accelerate launch examples/sft.py --verbose  # the same, with every step's own output on the terminal

Rows hold a chat (`messages`, or `prompt` + `completion`) whose media blocks take their items inline or from the
`images`/`videos`/`audios`/`imus` (list per row) or `image`/`video`/`audio`/`imu` (one per row) columns; see
AnyMALDataCollator. <output_dir> holds the adapters and projectors (AutoModelForMultimodalLM.from_pretrained loads
them onto the base in one call); --merge also writes <output_dir>/merged, a plain full checkpoint.
"""

import sys
from dataclasses import dataclass, field

from trl import ModelConfig

from transformers_anymal import AnyMALDataCollator
from transformers_anymal.training_anymal import (
    AnyMALScriptArguments,
    AnyMALSFTConfig,
    first_rows,
    load_dataset_dict,
    load_model_and_processor,
    lora_config,
    parse_recipe_args,
    save_merged,
    sft_trainer,
    train,
)


@dataclass
class SFTScriptArguments(AnyMALScriptArguments):
    merge: bool = field(default=False, metadata={"help": "Also write a merged full checkpoint to <output_dir>/merged."})


@dataclass
class AnyMALModelConfig(ModelConfig):
    use_peft: bool = field(default=True, metadata={"help": "LoRA on the language model; false trains it in full."})


def main(script_args, training_args, model_args):
    model, processor = load_model_and_processor(model_args)
    if getattr(model, "is_quantized", False) and not model_args.use_peft:
        raise ValueError("A 4-bit/8-bit language model cannot be trained in full: keep --use_peft (QLoRA).")
    model.set_trainable(language_model=not model_args.use_peft, encoders=False, projectors=True)

    dataset = load_dataset_dict(script_args.dataset_name, script_args.dataset_from_disk, script_args.dataset_config,
                                script_args.streaming)
    collator = AnyMALDataCollator(processor, sampling_rates=script_args.sampling_rates)
    splits = {"train": script_args.dataset_train_split}
    if training_args.eval_strategy != "no":
        splits["eval"] = script_args.dataset_test_split
    for split in splits.values():
        collator.check_dataset(first_rows(dataset[split]), model.config.modalities, name=f"{split} split")

    trainer = sft_trainer(
        model,
        peft_config=lora_config(model, model_args) if model_args.use_peft else None,
        args=training_args,
        data_collator=collator,
        train_dataset=dataset[splits["train"]],
        eval_dataset=dataset[splits["eval"]] if "eval" in splits else None,
        processing_class=processor,
        stream_errors=script_args.stream_errors,
    )
    train(trainer, training_args)
    trainer.save_model(training_args.output_dir)
    if script_args.merge and trainer.accelerator.is_main_process:
        save_merged(model_args, training_args.output_dir, f"{training_args.output_dir}/merged", processor)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def cli(argv: list[str] | None = None):
    main(*parse_recipe_args((SFTScriptArguments, AnyMALSFTConfig, AnyMALModelConfig), __doc__, argv))


if __name__ == "__main__":
    if sys.argv[1:] in ([], ["--verbose"]):  # the paper's whole recipe at toy scale on bundled data (anymal_demo/)
        from anymal_demo import run_demo

        run_demo(verbose=sys.argv[1:] == ["--verbose"])
    else:
        cli()
