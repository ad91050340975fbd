"""The training recipes, run as users run them, on the tiny model and a small chat dataset, on CPU."""

import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForMultimodalLM, AutoProcessor

from anymal_tester import TINY, make_chat_dataset, make_inputs, tiny_model
from child_process import kill_once_written, run, run_python


EXAMPLES = TINY.parents[1] / "examples"
CPU = ["--use_cpu", "--bf16", "false", "--report_to", "none", "--per_device_train_batch_size", "4",
       "--dataloader_num_workers", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    tiny_model().save_pretrained(root / "base")
    AutoProcessor.from_pretrained(TINY).save_pretrained(root / "base")
    return {"root": root, "base": str(root / "base"), "data": make_chat_dataset(root / "data")}


def recipe(script, setup, output_dir, *args, check=True, launcher=(sys.executable,), from_disk=True):
    command = [*launcher, str(EXAMPLES / script), "--model_name_or_path", setup["base"], "--dataset_name",
               setup["data"], *["--dataset_from_disk"] * from_disk, "--imu_sampling_rate", "100", "--output_dir",
               str(output_dir), *CPU, *map(str, args)]
    return run(command, check=check, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def changed_parameters(base_dir, tuned) -> set[str]:
    base = AutoModelForMultimodalLM.from_pretrained(base_dir).state_dict()
    tuned = tuned.state_dict()
    assert set(base) == set(tuned)
    return {key for key in base if not torch.equal(base[key], tuned[key])}


@pytest.mark.parametrize("quantized", [[], ["--load_in_4bit"]], ids=["full-precision", "4-bit"])
def test_alignment_trains_only_the_projectors(setup, tmp_path, quantized):
    result = recipe("align.py", setup, tmp_path, "--max_steps", 3, "--learning_rate", "1e-3", *quantized)
    assert "'loss'" in result.stdout + result.stderr and "it/s]" in result.stderr  # loss logs and a progress bar
    aligned = AutoModelForMultimodalLM.from_pretrained(tmp_path)  # a full checkpoint, whatever the precision
    changed = changed_parameters(setup["base"], aligned)
    assert changed and all(".projectors." in key for key in changed)
    assert {key.split(".")[2] for key in changed} == {"image", "imu"}  # the modalities in the data, nothing else
    inputs = make_inputs(aligned.config, [["image", "imu", "text"]])
    assert aligned.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def moved_beyond_bf16_rounding(start: torch.Tensor, end: torch.Tensor) -> float:
    """Share of the elements that changed, other than to their own bf16 rounding (all that bf16 training moves
    when its steps are smaller than bf16's resolution)."""
    return ((end != start) & (end != start.to(torch.bfloat16).float())).float().mean().item()


def logged_losses(result) -> list[float]:
    return [float(loss) for loss in re.findall(r"'loss': '([\d.]+)'", result.stdout + result.stderr)]


@pytest.mark.parametrize("stage", ["align.py", "sft.py"])
def test_4bit_training_keeps_trainable_weights_in_full_precision(setup, tmp_path, stage):
    """The paper's 70B set-up at toy scale: the language model in 4 bits, the projectors (and LoRA) in fp32."""
    arguments = ["--learning_rate", "2e-4", "--logging_steps", 1]
    full, quantized = (recipe(stage, setup, tmp_path / name, "--max_steps", 20, *arguments, *extra)
                       for name, extra in (("full", []), ("4-bit", ["--load_in_4bit"])))
    assert abs(logged_losses(quantized)[-1] - logged_losses(full)[-1]) <= 0.05 * logged_losses(full)[-1]

    recipe(stage, setup, tmp_path / "short", "--max_steps", 4, *arguments, "--load_in_4bit")
    base = AutoModelForMultimodalLM.from_pretrained(setup["base"]).state_dict()
    if stage == "align.py":  # a full checkpoint
        trained = AutoModelForMultimodalLM.from_pretrained(tmp_path / "short").state_dict()
    else:  # adapters and the projectors' trained copies, named as in the model
        saved = load_file(tmp_path / "short" / "adapter_model.safetensors")
        trained = {key.removeprefix("base_model.model."): tensor for key, tensor in saved.items()}
        assert any(".lora_" in key for key in trained)
        assert {tensor.dtype for tensor in trained.values()} == {torch.float32}  # LoRA too: trained in fp32
    for name in ("image", "imu"):  # in the data: every tensor of their projectors moves in 4 steps
        keys = [key for key in base if key.startswith(f"model.projectors.{name}.")]
        assert all(moved_beyond_bf16_rounding(base[key], trained[key]) >= 0.9 for key in keys), name
    for name in ("video", "audio"):  # not in the data: bit for bit what was loaded
        keys = [key for key in base if key.startswith(f"model.projectors.{name}.")]
        assert all(torch.equal(base[key], trained[key]) for key in keys), name


def test_cached_features_are_read_as_arrays_in_their_stored_dtype(tmp_path):
    from datasets import Dataset, DatasetDict, Features, List, Value

    from transformers_anymal import AnyMALDataCollator
    from transformers_anymal.training_anymal import load_dataset_dict

    spec = importlib.util.spec_from_file_location("cache_features", EXAMPLES / "cache_features.py")
    cache_features = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache_features)
    feature_columns = cache_features.feature_columns

    items = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float16)  # two items of (5, 4)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": "no"}]
    layouts = {  # as cache_features.py writes them (flat, with the shape), and nested
        "flat": ({"image_features": [[item.reshape(-1) for item in items]], "image_feature_shape": [[5, 4]]},
                 feature_columns("image", "float16")),
        "nested": ({"image_features": [list(items)]}, {"image_features": List(List(List(Value("float16"))))}),
    }
    collator = AnyMALDataCollator(AutoProcessor.from_pretrained(TINY))
    for name, (data, columns) in layouts.items():
        rows = Dataset.from_dict({"kind": ["pair"], **data}, features=Features({"kind": Value("string"), **columns}))
        DatasetDict({"train": rows}).save_to_disk(tmp_path / name)
        [row] = load_dataset_dict(tmp_path / name, from_disk=True)["train"]
        assert isinstance(row["image_features"], np.ndarray) and row["image_features"].dtype == np.float16, name
        assert row["kind"] == "pair", name  # the other columns as they were
        features = collator([{**row, "messages": chat}])["encoder_features"]["image"]
        assert features.dtype == torch.float16 and torch.equal(features, torch.from_numpy(items)), name


def test_alignment_on_cached_encoder_features(setup, tmp_path):
    from datasets import load_from_disk

    from transformers_anymal import AnyMALDataCollator
    from transformers_anymal.training_anymal import load_dataset_dict

    run_python(EXAMPLES / "cache_features.py", "--model_name_or_path", setup["base"], "--dataset_name",
               setup["data"], "--dataset_from_disk", "--imu_sampling_rate", "100", "--output_dir",
               tmp_path / "features", "--shard_size", 5, "--batch_size", 3, timeout=300)
    manifest = json.loads((tmp_path / "features" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 16 and len(manifest["splits"]["train"]["shards"]) == 3  # 6, 6, 4
    raw, cached = load_from_disk(setup["data"])["train"], load_dataset_dict(tmp_path / "features")["train"]
    assert "images" not in cached.column_names and "image_features" in cached.column_names
    row = next(row for row in cached if len(row["image_features"]))  # the recipes read features as arrays
    assert isinstance(row["image_features"], np.ndarray) and row["image_features"].dtype == np.float32
    assert row["image_features"].ndim == 2 and len(row["image_feature_shape"]) == 2  # flat items and their shape
    assert isinstance(row["messages"], list)  # the other columns as they were
    model = AutoModelForMultimodalLM.from_pretrained(setup["base"]).eval()
    collator = AnyMALDataCollator(AutoProcessor.from_pretrained(setup["base"]), sampling_rates={"imu": 100})
    on_the_fly, from_cache = collator([raw[i] for i in range(8)]), collator([cached[i] for i in range(8)])
    assert "encoder_features" in from_cache and "pixel_values" not in from_cache
    assert torch.equal(on_the_fly["labels"], from_cache["labels"])
    with torch.no_grad():
        assert torch.allclose(model(**on_the_fly).loss, model(**from_cache).loss, rtol=1e-5)

    setup = {**setup, "data": str(tmp_path / "features")}
    recipe("align.py", setup, tmp_path / "aligned", "--max_steps", 2, "--learning_rate", "1e-3", from_disk=False)
    changed = changed_parameters(setup["base"], AutoModelForMultimodalLM.from_pretrained(tmp_path / "aligned"))
    assert changed and all(".projectors." in key for key in changed)


def test_a_feature_cache_refuses_to_go_on_with_other_rows_or_other_encoder_weights(setup, tmp_path):
    """Going on from a cache's shards with other data, or with encoders of the same configs trained apart (saved to
    the same folder), would mix features of two runs in one dataset: refused, naming what differs."""
    base = tmp_path / "base"
    shutil.copytree(setup["base"], base)

    def cache(data):
        return run_python(EXAMPLES / "cache_features.py", "--model_name_or_path", base, "--dataset_name", data,
                          "--dataset_from_disk", "--imu_sampling_rate", "100", "--output_dir", tmp_path / "features",
                          check=False, timeout=300)

    assert cache(setup["data"]).returncode == 0
    again = cache(setup["data"])  # the same run again: nothing left to encode
    assert again.returncode == 0 and "already written; going on from there" in again.stdout

    other_rows = cache(make_chat_dataset(tmp_path / "other-data", seed=1))
    assert other_rows.returncode != 0 and "the dataset's rows: {'train': '16 rows, " in other_rows.stderr
    assert f"delete {tmp_path / 'features'} to encode again" in other_rows.stderr
    assert "weights" not in other_rows.stderr.split("ValueError")[-1]

    tiny_model(seed=1).save_pretrained(base)  # the same configs, other weights
    other_weights = cache(setup["data"])
    assert other_weights.returncode != 0 and "the encoders' weights" in other_weights.stderr
    assert "rows" not in other_weights.stderr.split("ValueError")[-1]
    assert json.loads((tmp_path / "features" / "manifest.json").read_text())["splits"]["train"]["rows"] == 16

    identity = tmp_path / "features" / "identity.json"  # as caches written before the weights were recorded
    identity.write_text(json.dumps({key: value for key, value in json.loads(identity.read_text()).items()
                                    if key != "encoder_weights"}))
    older = cache(setup["data"])
    assert older.returncode != 0 and "the encoders' weights: not recorded (an older cache_features.py)" in older.stderr


def test_instruction_tuning_trains_adapters_and_projectors(setup, tmp_path):
    recipe("sft.py", setup, tmp_path, "--max_steps", 3, "--learning_rate", "1e-3", "--merge")
    adapters = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_A" in key for key in adapters) and any(".projectors." in key for key in adapters)
    assert not any(".encoders." in key for key in adapters)
    tuned = AutoModelForMultimodalLM.from_pretrained(tmp_path)  # base + adapters + projectors in one call
    merged = AutoModelForMultimodalLM.from_pretrained(tmp_path / "merged")
    changed = changed_parameters(setup["base"], merged)
    assert {key.split(".")[1] for key in changed} == {"language_model", "projectors"}
    inputs = make_inputs(merged.config, [["image", "imu", "text"]])
    with torch.no_grad():
        assert torch.allclose(tuned(**inputs).logits, merged(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("num_items_in_batch", [None, 23])
def test_cpu_training_loss_projects_only_labelled_positions_and_equals_trls(setup, tmp_path, num_items_in_batch):
    """On a CPU, AnyMALSFTTrainer's loss scores only the positions that have a label, and gives TRL's loss and
    gradients (which project every position through the head there)."""
    from datasets import load_from_disk
    from trl import SFTTrainer

    from transformers_anymal import AnyMALDataCollator
    from transformers_anymal.training_anymal import AnyMALSFTConfig, sft_trainer

    model = AutoModelForMultimodalLM.from_pretrained(setup["base"])
    model.set_trainable(language_model=True, encoders=False, projectors=True)
    processor = AutoProcessor.from_pretrained(setup["base"])
    collator = AnyMALDataCollator(processor, sampling_rates={"imu": 100})
    rows = load_from_disk(setup["data"])["train"]
    args = AnyMALSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    trainer = sft_trainer(model, args=args, data_collator=collator, train_dataset=rows, processing_class=processor)
    batch = collator([rows[index] for index in range(8)])
    positions = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: positions.append(args[0].shape))
    model.train()

    def loss_and_grads(compute_loss):
        model.zero_grad()
        loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=num_items_in_batch)
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    compact_loss, compact_grads = loss_and_grads(type(trainer).compute_loss)
    trl_loss, trl_grads = loss_and_grads(SFTTrainer.compute_loss)
    hook.remove()
    answers = batch["labels"][:, 1:] != -100  # the positions that predict an answer token
    union = answers.any(0).sum().item()  # the positions that do in any row
    # each row's own answer positions only, fewer than the union's in every row, fewer still than every position
    assert positions[0][0] == answers.sum().item() < len(answers) * union < batch["input_ids"].numel()
    assert compact_loss == pytest.approx(trl_loss, rel=1e-5)
    assert compact_grads.keys() == trl_grads.keys() and any(".language_model." in name for name in compact_grads)
    for name, grad in compact_grads.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy, batch_size, accumulation", [("group_by_length", 4, 1), ("batch_rebalance", 2, 2)])
def test_length_sampling_batches_chat_rows_of_like_length(setup, tmp_path, strategy, batch_size, accumulation):
    """`--train_sampling_strategy group_by_length` and `batch_rebalance` work on chat rows, which have no `input_ids`
    for the Trainer to measure: the recipes give it each row's token count, and its batches carry less padding than
    random ones. Evaluation datasets, one or several, get the count too."""
    from datasets import load_from_disk

    from transformers_anymal import AnyMALDataCollator
    from transformers_anymal.training_anymal import AnyMALSFTConfig, sft_trainer

    model = AutoModelForMultimodalLM.from_pretrained(setup["base"])
    processor = AutoProcessor.from_pretrained(setup["base"])
    collator = AnyMALDataCollator(processor, sampling_rates={"imu": 100})
    rows = load_from_disk(make_chat_dataset(tmp_path / "data", rows=64))["train"]

    def padded_and_real_tokens(strategy: str) -> tuple[int, int]:
        args = AnyMALSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", seed=0,
                               per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                               train_sampling_strategy=strategy)
        trainer = sft_trainer(model, args=args, data_collator=collator, train_dataset=rows, processing_class=processor,
                              eval_dataset={"a": rows.select(range(8)), "b": rows.select(range(8, 12))})
        masks = [batch["attention_mask"] for batch in trainer.get_train_dataloader()]
        assert sum(len(mask) for mask in masks) == len(rows)
        if strategy != "random":
            lengths = [collator.sequence_length(row) for row in rows]
            assert trainer.train_dataset["length"] == lengths
            for name in ("a", "b"):  # the Trainer's evaluation sampler groups by length too
                assert sum(len(batch["input_ids"]) for batch in trainer.get_eval_dataloader(name)) == (
                    8 if name == "a" else 4)
        return sum(mask.numel() for mask in masks), sum(mask.sum().item() for mask in masks)

    grouped, real = padded_and_real_tokens(strategy)
    shuffled, same_real = padded_and_real_tokens("random")
    assert real == same_real and grouped < shuffled


def lora_trainer(setup, tmp_path, base_kl_weight: float, rows, random_adapters: bool = True, **args):
    """A LoRA AnyMALSFTTrainer of the tiny model on `rows`; with `random_adapters`, the adapters' B matrices random
    (not zero, as LoRA starts), so the tuned model answers otherwise than the model without adapters."""
    from trl import ModelConfig

    from transformers_anymal import AnyMALDataCollator
    from transformers_anymal.training_anymal import AnyMALSFTConfig, lora_config, sft_trainer

    model = AutoModelForMultimodalLM.from_pretrained(setup["base"])
    model.set_trainable(language_model=False, encoders=False, projectors=True)
    processor = AutoProcessor.from_pretrained(setup["base"])
    args = AnyMALSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                           base_kl_weight=base_kl_weight, **args)
    peft_config = lora_config(model, ModelConfig(lora_r=4, lora_dropout=0.0))
    trainer = sft_trainer(model, peft_config=peft_config, args=args, train_dataset=rows,
                          data_collator=AnyMALDataCollator(processor, sampling_rates={"imu": 100}),
                          processing_class=processor)
    torch.manual_seed(0)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name and random_adapters:
            parameter.data.normal_(0, 0.2)
    return trainer


def kl_to_base(trainer, batch: dict) -> torch.Tensor:
    """Per row, KL(model without adapters || model) summed over the row's labelled positions, from full logits."""
    from torch.nn import functional

    model = trainer.model
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        tuned = model(**inputs).logits.log_softmax(-1)
        with model.disable_adapter():
            base = model(**inputs).logits.log_softmax(-1)
    labelled = functional.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100
    return ((base.exp() * (base - tuned)).sum(-1) * labelled).sum(1)


def test_base_kl_weight_adds_the_kl_to_the_llm_without_adapters_on_text_only_rows(setup, tmp_path):
    """The loss with base_kl_weight is the cross-entropy plus the weight times the KL divergence, from the model
    with its adapters disabled, of the text-only rows' answer tokens (over the batch's labelled tokens); rows with
    media add none of it."""
    from datasets import load_from_disk

    rows = load_from_disk(setup["data"])["train"]
    trainer = lora_trainer(setup, tmp_path, 3.0, rows)
    model, collator = trainer.model, trainer.data_collator
    model.train()

    def losses(batch):
        with torch.no_grad():
            with_kl = trainer.compute_loss(model, dict(batch)).item()
            trainer.args.base_kl_weight = 0.0
            plain = trainer.compute_loss(model, dict(batch)).item()
            trainer.args.base_kl_weight = 3.0
        return with_kl, plain

    kinds = rows["kind"]
    mixed = collator([rows[index] for index in range(8)])
    text = torch.tensor([kind == "text" for kind in kinds[:8]])
    assert text.any() and not text.all()
    with_kl, plain = losses(mixed)
    kl = kl_to_base(trainer, mixed)
    labelled = (mixed["labels"][:, 1:] != -100).sum().item()
    assert kl[text].min() > 1e-3  # the random adapters move the text answers
    assert with_kl == pytest.approx(plain + 3.0 * kl[text].sum().item() / labelled, rel=1e-4)

    media_only = collator([rows[index] for index, kind in enumerate(kinds) if kind != "text"][:6])
    with_kl, plain = losses(media_only)
    assert with_kl == pytest.approx(plain, rel=1e-6)


def test_training_with_base_kl_weight_keeps_text_answers_nearer_the_llm_without_adapters(setup, tmp_path):
    """Trained on text-only rows whose answers the untouched LLM does not give, the adapters move those answers far
    less with base_kl_weight than without."""
    from datasets import load_from_disk

    rows = load_from_disk(setup["data"])["train"]
    rows = rows.select([index for index, kind in enumerate(rows["kind"]) if kind == "text"])
    drift = {}
    for weight in (0.0, 100.0):
        trainer = lora_trainer(setup, tmp_path / str(weight), weight, rows, random_adapters=False, max_steps=40,
                               learning_rate=2e-3, per_device_train_batch_size=len(rows), save_strategy="no",
                               logging_steps=100)
        trainer.train()
        trainer.model.eval()
        drift[weight] = kl_to_base(trainer, trainer.data_collator(list(rows))).sum().item()
    assert drift[0.0] > 0.1 and drift[100.0] < drift[0.0] / 3


def test_base_kl_weight_refuses_a_model_without_adapters_and_a_loss_it_cannot_add_to(setup, tmp_path):
    from datasets import load_from_disk

    from transformers_anymal import AnyMALDataCollator
    from transformers_anymal.training_anymal import AnyMALSFTConfig, sft_trainer

    rows = load_from_disk(setup["data"])["train"]
    model = AutoModelForMultimodalLM.from_pretrained(setup["base"])
    processor = AutoProcessor.from_pretrained(setup["base"])
    args = AnyMALSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", base_kl_weight=1.0)
    with pytest.raises(ValueError, match="without its LoRA adapters, and this model has none: train with --use_peft"):
        sft_trainer(model, args=args, train_dataset=rows, data_collator=AnyMALDataCollator(processor),
                    processing_class=processor)
    with pytest.raises(ValueError, match="adds to the plain cross-entropy.*drop those or set base_kl_weight to 0"):
        lora_trainer(setup, tmp_path, 1.0, rows, label_smoothing_factor=0.1)


def test_lora_target_modules_pick_the_language_models_layers_by_name():
    from trl import ModelConfig

    from transformers_anymal.training_anymal import lora_config

    model = tiny_model()
    every = lora_config(model, ModelConfig()).target_modules
    attention = lora_config(model, ModelConfig(lora_target_modules=["q_proj", "v_proj"])).target_modules
    assert every and all(".language_model." in name for name in every)  # never an encoder's or projector's layer
    assert {name.rsplit(".", 1)[-1] for name in every} > {"q_proj", "v_proj"}
    assert set(attention) == {name for name in every if name.endswith(("q_proj", "v_proj"))}
    with pytest.raises(ValueError, match="names none of the language model's linear layers.*q_proj"):
        lora_config(model, ModelConfig(lora_target_modules=["query"]))


def test_qlora_instruction_tuning_from_a_yaml_config(setup, tmp_path):
    (tmp_path / "recipe.yaml").write_text("max_steps: 2\nload_in_4bit: true\nlora_r: 4\nmerge: true\n")
    recipe("sft.py", setup, tmp_path, "--config", tmp_path / "recipe.yaml")
    assert '"r": 4' in (tmp_path / "adapter_config.json").read_text()
    merged = AutoModelForMultimodalLM.from_pretrained(tmp_path / "merged")
    assert not getattr(merged, "is_quantized", False)  # merged onto the full-precision base
    assert changed_parameters(setup["base"], merged)


def test_bad_setups_fail_before_training(setup, tmp_path):
    full = recipe("sft.py", setup, tmp_path, "--load_in_4bit", "--use_peft", "false", "--max_steps", 1, check=False)
    assert full.returncode != 0 and "cannot be trained in full: keep --use_peft" in full.stderr
    from datasets import load_from_disk

    broken = load_from_disk(setup["data"])
    rows = broken["train"].to_list()
    rows[1]["imus"] = []  # a row whose chat has an IMU block but no recording
    broken["train"] = broken["train"].from_list(rows, features=broken["train"].features)
    broken.save_to_disk(tmp_path / "broken")
    bad = run_python(EXAMPLES / "align.py", "--model_name_or_path", setup["base"], "--dataset_name",
                     tmp_path / "broken", "--dataset_from_disk", "--imu_sampling_rate", "100", "--output_dir",
                     tmp_path / "out", *CPU, check=False)
    assert bad.returncode != 0 and "row 1: a bare {'type': 'imu'} block has no item left" in bad.stderr
    assert "'loss'" not in bad.stdout + bad.stderr  # training never started


def test_resume_after_a_kill_skips_a_half_written_checkpoint_and_is_exact(setup, tmp_path):
    arguments = ["--max_steps", 8, "--save_steps", 2, "--learning_rate", "1e-3", "--lora_dropout", "0.1"]
    recipe("sft.py", setup, tmp_path / "straight", *arguments)

    command = [sys.executable, str(EXAMPLES / "sft.py"), "--model_name_or_path", setup["base"], "--dataset_name",
               setup["data"], "--dataset_from_disk", "--imu_sampling_rate", "100", "--output_dir",
               str(tmp_path / "killed"), *CPU, *map(str, arguments)]
    kill_once_written(command, tmp_path / "killed" / "checkpoint-4" / "trainer_state.json")
    assert not (tmp_path / "killed" / "checkpoint-8").exists(), "killed too late to test resuming"
    shutil.rmtree(tmp_path / "killed" / "checkpoint-6", ignore_errors=True)
    shutil.copytree(tmp_path / "killed" / "checkpoint-4", tmp_path / "killed" / "checkpoint-6",
                    ignore=shutil.ignore_patterns("trainer_state.json", "rng_state*"))  # killed while writing it
    resumed_run = recipe("sft.py", setup, tmp_path / "killed", *arguments, "--resume_from_checkpoint", "last")
    assert "Skipping " + str(tmp_path / "killed" / "checkpoint-6") in resumed_run.stderr
    assert "Resuming from " + str(tmp_path / "killed" / "checkpoint-4") in resumed_run.stderr

    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key, tensor in straight.items():
        assert torch.equal(tensor, resumed[key]), key


def test_a_checkpoint_without_optimizer_state_is_refused_unless_asked(setup, tmp_path):
    arguments = ["--max_steps", 4, "--save_steps", 2]
    recipe("sft.py", setup, tmp_path / "run", *arguments)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    (checkpoint / "optimizer.pt").unlink()
    refused = recipe("sft.py", setup, tmp_path / "run", *arguments, "--resume_from_checkpoint", checkpoint,
                     check=False)
    assert refused.returncode != 0 and f"{checkpoint} has no optimizer state (optimizer.pt)" in refused.stderr
    assert "--resume_without_optimizer_state" in refused.stderr and "'loss'" not in refused.stdout + refused.stderr
    resumed = recipe("sft.py", setup, tmp_path / "run", *arguments, "--resume_from_checkpoint", checkpoint,
                     "--resume_without_optimizer_state")
    assert "without its optimizer state (optimizer.pt): they start afresh" in resumed.stderr
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").unlink()
    nothing = recipe("sft.py", setup, tmp_path / "run", *arguments, "--resume_from_checkpoint", "last", check=False)
    assert nothing.returncode != 0 and "no complete checkpoint-N folder" in nothing.stderr


def test_two_process_ddp_keeps_ranks_identical(setup, tmp_path):
    # each rank's output also goes to its own file (`--tee`), so the ranks' lines cannot interleave
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                "--log_dir", str(tmp_path / "logs"), "--tee", "3")
    os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        recipe("sft.py", setup, tmp_path / "out", "--max_steps", 3, "--learning_rate", "1e-3", launcher=launcher)
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    logs = {path.parent.name: path.read_text() for path in (tmp_path / "logs").rglob("stdout.log")}
    digests = {rank: re.findall(r"rank (\d): digest of the trainable weights (\w+)", text) for rank, text in logs.items()}
    assert sorted(digests) == ["0", "1"], logs
    assert digests["0"][0][0] == "0" and digests["1"][0][0] == "1", digests
    assert digests["0"][0][1] == digests["1"][0][1], digests


def test_recipes_document_their_options_and_ship_gpu_configs():
    for script in ("align.py", "sft.py"):
        help_text = run_python(EXAMPLES / script, "--help", timeout=300).stdout
        for option in ("--model_name_or_path", "--dataset_name", "--imu_sampling_rate", "--load_in_4bit", "--config",
                       "--resume_from_checkpoint", "--push_to_hub", "--output_dir"):
            assert option in help_text, (script, option)
    configs = {path.stem: yaml.safe_load(path.read_text()) for path in (EXAMPLES / "accelerate_configs").glob("*.yaml")}
    assert configs["fsdp2"]["fsdp_config"]["fsdp_version"] == 2
    assert configs["deepspeed_zero3"]["deepspeed_config"]["zero_stage"] == 3
    assert configs["ddp"]["distributed_type"] == "MULTI_GPU"
