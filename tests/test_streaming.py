"""Streaming training data: WebDataset shards as chats, disjoint shards per rank, exact resume, corrupt samples."""

import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from transformers_anymal import AnyMALDataCollator
from transformers_anymal.streaming_anymal import load_streaming_dataset

from anymal_tester import TINY, make_webdataset_shards, tiny_model, write_video
from child_process import kill_once_written, run


EXAMPLES = TINY.parents[1] / "examples"
CPU = ["--use_cpu", "--bf16", "false", "--report_to", "none", "--per_device_train_batch_size", "4", "--seed", "0",
       "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    tiny_model().save_pretrained(root / "base")
    AutoProcessor.from_pretrained(TINY).save_pretrained(root / "base")
    return {"base": str(root / "base"), "shards": make_webdataset_shards(root / "shards")}  # 4 shards of 6 samples


def align(setup, output_dir, *args, shards=None, launcher=(sys.executable,), check=True, **kwargs):
    command = [*launcher, *kwargs.pop("script", [EXAMPLES / "align.py"]), "--model_name_or_path", setup["base"],
               "--dataset_name", shards or setup["shards"], "--streaming", "--output_dir", output_dir, *CPU, *args]
    return run(command, check=check, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})})


def test_webdataset_samples_become_chats_the_collator_reads(tmp_path):
    shards = make_webdataset_shards(tmp_path / "av", shards=1, per_shard=4, media=("flac", "mp4"))
    rows = list(load_streaming_dataset(shards)["train"])
    assert [row["__key__"] for row in rows] == [f"00000000{i}" for i in range(4)]
    assert rows[0]["messages"] == [{"role": "user", "content": [{"type": "video"}, {"type": "audio"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "caption of sample 000000000"}]}]
    assert rows[3]["messages"][0]["content"][-1]["text"] == "What is it?"  # the chat of the sample's .json
    processor = AutoProcessor.from_pretrained(TINY)
    batch = AnyMALDataCollator(processor)(rows)
    assert batch["input_features"].shape[0] == batch["pixel_values_videos"].shape[0] == 4

    clip = write_video(tmp_path / "clip.mp4", gray_levels=tuple(range(0, 200, 10)))  # a clip's bytes sample as its file
    from_bytes = processor(text=f"{processor.video_token}", videos=[Path(clip).read_bytes()], return_tensors="pt")
    from_file = processor(text=f"{processor.video_token}", videos=[clip], return_tensors="pt")
    assert torch.equal(from_bytes["pixel_values_videos"], from_file["pixel_values_videos"])


def test_corrupt_samples_are_skipped_and_counted_or_stop_the_run(setup, tmp_path):
    shards = make_webdataset_shards(tmp_path / "shards", shards=1, per_shard=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    with tarfile.open(Path(shards) / "train-00000.tar") as source, tarfile.open(broken / "train-00000.tar", "w") as tar:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name == "000000002.jpg":
                data = data[: len(data) // 3]  # a JPEG cut short
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    skipping = align(setup, tmp_path / "skip", "--max_steps", "2", "--dataloader_num_workers", "1", shards=broken)
    assert "Skipped sample '000000002'" in skipping.stderr
    assert "'skipped_samples': 1," in skipping.stdout + skipping.stderr
    assert "trained on 7 streamed samples, skipped 1 that failed to decode" in skipping.stdout

    raising = align(setup, tmp_path / "raise", "--max_steps", "2", "--dataloader_num_workers", "1", "--stream_errors",
                    "raise", shards=broken, check=False)
    assert raising.returncode != 0 and "000000002" in raising.stderr


def test_streaming_decodes_in_workers_and_refuses_a_save_to_disk_folder(setup, tmp_path):
    no_workers = align(setup, tmp_path / "out", "--max_steps", "1", "--dataloader_num_workers", "0", check=False)
    assert no_workers.returncode != 0 and "pass --dataloader_num_workers 1 (or more)" in no_workers.stderr
    from_disk = align(setup, tmp_path / "out", "--max_steps", "1", "--dataset_from_disk", check=False)
    assert from_disk.returncode != 0 and "a save_to_disk folder loads with --dataset_from_disk alone" in from_disk.stderr


def test_evaluation_streams_every_sample_once(setup, tmp_path):
    run([sys.executable, EXAMPLES / "eval_anymal.py", "--model_name_or_path", setup["base"], "--dataset_name",
         setup["shards"], "--streaming", "--split", "train", "--output_dir", tmp_path, "--max_new_tokens", "2",
         "--batch_size", "5"], timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    references = [sample["references"][0] for sample in json.loads((tmp_path / "report.json").read_text())["samples"]]
    keys = [f"{shard:05d}{position:04d}" for shard in range(4) for position in range(6)]
    assert references == [f"{'sample' if key.endswith('3') else 'caption of sample'} {key}" for key in keys]


def cache(setup, output_dir, *args, shards=None, launcher=(sys.executable,), check=True, env=None):
    command = [*launcher, EXAMPLES / "cache_features.py", "--model_name_or_path", setup["base"], "--dataset_name",
               shards or setup["shards"], "--streaming", "--output_dir", output_dir, "--shard_size", "4",
               "--batch_size", "4", *args]
    return run(command, check=check, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def cached_keys(folder: Path) -> dict[str, list[str]]:
    """The `__key__`s in each parquet shard of a cache split."""
    import pyarrow.parquet as pq

    return {path.name: pq.read_table(path, columns=["__key__"]).column(0).to_pylist()
            for path in sorted(folder.glob("*.parquet"))}


def with_a_corrupt_jpeg(shards: str, folder: Path, shard: int, key: str) -> Path:
    """A copy of the WebDataset `shards` whose sample `key` in shard `shard` has its JPEG cut short."""
    folder.mkdir()
    for path in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(path) as source, tarfile.open(folder / path.name, "w") as tar:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                if path.name == f"train-{shard:05d}.tar" and member.name == f"{key}.jpg":
                    data = data[: len(data) // 3]
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return folder


def test_a_stream_cache_crashed_midway_goes_on_without_encoding_finished_shards_again(setup, tmp_path):
    broken = with_a_corrupt_jpeg(setup["shards"], tmp_path / "broken", shard=3, key="000030004")
    skipping = cache(setup, tmp_path / "skipped", "--num_workers", "2", shards=broken)
    manifest = json.loads((tmp_path / "skipped" / "manifest.json").read_text())["splits"]["train"]
    assert manifest["rows"] == 23 and manifest["skipped"] == 1
    assert [row["key"] for row in manifest["skipped_examples"]] == ["000030004"]
    assert "skipped sample '000030004'" in skipping.stdout

    # 2 workers read shards 0, 2 and 1, 3 in turns, a shard of output per batch: the 6th batch holds the bad sample
    crashed = cache(setup, tmp_path / "cache", "--num_workers", "2", "--stream_errors", "raise", shards=broken,
                    check=False)
    assert crashed.returncode != 0 and "000030004" in crashed.stderr
    finished = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "cache" / "train").glob("*.parquet")}
    assert len(finished) == 5, crashed.stderr[-2000:]
    resumed = cache(setup, tmp_path / "cache", "--num_workers", "2", "--stream_errors", "raise")  # the data mended
    assert "5 shard(s) of 20 rows already written; going on from there" in resumed.stdout
    assert all((tmp_path / "cache" / "train" / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())

    cache(setup, tmp_path / "straight", "--num_workers", "2")
    assert cached_keys(tmp_path / "cache" / "train") == cached_keys(tmp_path / "straight" / "train")
    from transformers_anymal.training_anymal import load_dataset_dict

    resumed_rows, straight_rows = (load_dataset_dict(tmp_path / name)["train"] for name in ("cache", "straight"))
    for column in ("image_features", "imu_features"):
        assert np.array_equal(np.stack(resumed_rows[column]), np.stack(straight_rows[column])), column
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["splits"]["train"]["rows"] == 24


def test_a_shard_cut_short_is_left_out_and_named(setup, tmp_path):
    from transformers.testing_utils import CaptureLogger

    from transformers_anymal import streaming_anymal

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(3):
        data = (Path(setup["shards"]) / f"train-{shard:05d}.tar").read_bytes()
        # shard 1 stops in the middle of a sample; shard 2 loses only the archive's zero padding at its end
        (folder / f"train-{shard:05d}.tar").write_bytes({1: data[: len(data) // 2], 2: data[:-3000]}.get(shard, data))
    with CaptureLogger(streaming_anymal.logger) as captured:
        keys = [row["__key__"] for row in load_streaming_dataset(folder)["train"]]
    assert keys == [f"{shard:05d}{position:04d}" for shard in (0, 2) for position in range(6)]
    assert f"Leaving out the WebDataset shard {folder / 'train-00001.tar'}: it is cut short" in captured.out
    assert "train-00002" not in captured.out


@pytest.fixture(scope="module")
def float32_cache(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("float32") / "cache"
    cache(setup, folder, "--num_workers", "1")
    return folder


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_low_precision_cache_gives_the_float32_features_rounded_whole_and_streamed(setup, float32_cache, tmp_path,
                                                                                     dtype):
    from transformers_anymal.training_anymal import load_dataset_dict

    cache(setup, tmp_path / dtype, "--dtype", dtype, "--num_workers", "1")
    assert json.loads((tmp_path / dtype / "manifest.json").read_text())["dtype"] == dtype
    reference = {row["__key__"]: row for row in load_dataset_dict(float32_cache)["train"]}
    whole = {row["__key__"]: row for row in load_dataset_dict(tmp_path / dtype)["train"]}
    streamed = {row["__key__"]: row for row in load_dataset_dict(tmp_path / dtype, streaming=True)["train"]}
    assert len(streamed) == 24 and streamed.keys() == whole.keys() == reference.keys()
    stored = np.float16 if dtype == "float16" else np.uint16  # bfloat16 as its bit patterns: parquet has no bfloat16
    for key, row in streamed.items():
        for column in ("image_features", "imu_features"):
            assert row[column].dtype == whole[key][column].dtype == stored, column
            assert np.array_equal(row[column], whole[key][column]), (key, column)

    collator = AnyMALDataCollator(AutoProcessor.from_pretrained(setup["base"]))
    keys = sorted(streamed)[:4]
    low, full = (collator([rows[key] for key in keys])["encoder_features"] for rows in (streamed, reference))
    for name in ("image", "imu"):
        assert low[name].dtype == getattr(torch, dtype) and full[name].dtype == torch.float32
        assert torch.equal(low[name], full[name].to(low[name].dtype)), name  # the same rounding as torch's


def test_folders_of_the_same_name_each_load_their_own_rows(tmp_path):
    # as two runs' `features` caches: datasets alone would key its cached copy of both by the name (dataset_builder)
    from datasets import Dataset

    from transformers_anymal.training_anymal import load_dataset_dict

    runs = {"first": [1, 2, 3], "second": [7, 8]}
    for name, values in runs.items():
        folder = tmp_path / name / "features"
        (folder / "train").mkdir(parents=True)
        Dataset.from_dict({"x": values}).to_parquet(folder / "train" / "0.parquet")
        (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                          "    path: train/*.parquet\n---\n")
    for name, values in runs.items():
        assert list(load_dataset_dict(tmp_path / name / "features")["train"]["x"]) == values, name
        assert [row["x"] for row in load_dataset_dict(tmp_path / name / "features", streaming=True)["train"]] == values


def test_instruction_tuning_streams_chat_rows_from_parquet_shards(setup, tmp_path):
    from datasets import load_from_disk

    from anymal_tester import make_chat_dataset

    rows = load_from_disk(make_chat_dataset(tmp_path / "chats"))["train"]  # chats with image and IMU columns
    (tmp_path / "parquet").mkdir()
    for shard in range(2):
        rows.shard(num_shards=2, index=shard).to_parquet(tmp_path / "parquet" / f"train-{shard:05d}.parquet")
    result = run([sys.executable, EXAMPLES / "sft.py", "--model_name_or_path", setup["base"], "--dataset_name",
                  tmp_path / "parquet", "--streaming", "--imu_sampling_rate", "100", "--output_dir", tmp_path / "out",
                  *CPU, "--max_steps", "4", "--dataloader_num_workers", "2"],
                 timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "rank 0: trained on 16 streamed samples, skipped 0" in result.stdout  # every chat, one pass
    adapters = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any("lora_B" in key and adapters[key].abs().sum() > 0 for key in adapters)


# The demo's data (examples/anymal_demo) written as WebDataset shards by examples/export_webdataset.py: one shard set
# per modality, 24 captioned samples in 4 shards each. The 2-rank, resume and cache runs take one modality each (a
# few minutes in all); ANYMAL_STREAMING_MODALITIES=all runs each of them on all four.
DEMO_MODALITIES = ("image", "video", "audio", "imu")


def on_modalities(default: str):
    every = os.environ.get("ANYMAL_STREAMING_MODALITIES") == "all"
    return pytest.mark.parametrize("modality", DEMO_MODALITIES if every else [default])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from datasets import DatasetDict

    sys.path.insert(0, str(EXAMPLES))
    import export_webdataset
    from anymal_demo.data import build_demo_dataset, load_media
    from anymal_demo.model import media_processor, tiny_anymal_config

    from transformers_anymal import AnyMALForConditionalGeneration

    root = tmp_path_factory.mktemp("demo")
    media = load_media(0)
    captions = build_demo_dataset(media, 0, videos_per_split={"train": 24, "test": 1})["align"]
    picked = [index for kind in DEMO_MODALITIES for index in
              [index for index, row_kind in enumerate(captions["kind"]) if row_kind == kind][:24]]
    rows = captions.select(picked)
    DatasetDict(train=rows).save_to_disk(root / "rows")
    export_webdataset.main(["--dataset_name", str(root / "rows"), "--dataset_from_disk", "--output_dir",
                            str(root / "shards"), "--samples_per_shard", "6"])

    recordings = np.concatenate([recording for recording, _ in media["imu"]["train"]], axis=1)
    processor = media_processor(recordings.mean(1).tolist(), recordings.std(1).tolist())
    torch.manual_seed(0)
    AnyMALForConditionalGeneration(tiny_anymal_config()).save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return {"base": str(root / "base"), "shards": str(root / "shards"), "rows": rows}


def demo_keys(demo, modality: str) -> dict[str, str]:
    """Each sample's key in the modality's shard set, with the shard it is in."""
    return {row["__key__"]: Path(row["__url__"]).name for row in load_streaming_dataset(demo["shards"], modality)["train"]}


def test_demo_data_exported_as_webdataset_streams_back_to_the_rows_own_batches(demo, tmp_path):
    readme = (Path(demo["shards"]) / "README.md").read_text()
    assert re.findall(r"config_name: (\S+)", readme) == sorted(DEMO_MODALITIES)
    collator = AnyMALDataCollator(AutoProcessor.from_pretrained(demo["base"]))
    for modality in DEMO_MODALITIES:
        assert len(list((Path(demo["shards"]) / modality).glob("train-*.tar"))) == 4
        streamed = list(load_streaming_dataset(demo["shards"], modality)["train"])
        rows = [demo["rows"][int(row["__key__"])] for row in streamed]
        assert len(streamed) == 24 and {row["kind"] for row in rows} == {modality}
        expected, got = collator(rows), collator(streamed)  # media written losslessly: the very same inputs
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), modality

    from transformers_anymal.webdataset_anymal import write_webdataset

    two_images = {**demo["rows"][0], "images": [demo["rows"][0]["images"][0]] * 2}
    two_images["messages"] = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                              two_images["messages"][1]]
    with pytest.raises(ValueError, match="row 1 holds more than one image; a WebDataset sample has one file"):
        write_webdataset([demo["rows"][0], two_images], tmp_path / "two")
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    gif_video = {"messages": [{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.gif")}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "a clip"}]}]}
    with pytest.raises(ValueError, match=r"row 0: its video is a .gif file, .* convert it to one of .mp4"):
        write_webdataset([gif_video], tmp_path / "gif")
    import export_webdataset

    with pytest.raises(ValueError, match="already holds shards; write to a new folder"):
        export_webdataset.main(["--dataset_name", "unused", "--output_dir", demo["shards"]])


@on_modalities("audio")
def test_two_ranks_stream_each_demo_sample_once_and_end_identical(demo, modality, tmp_path):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0")
    # one pass: 24 samples over 2 ranks in batches of 4 is 3 steps
    result = align(demo, tmp_path / "out", "--dataset_config", modality, "--max_steps", "3",
                   "--dataloader_num_workers", "1", launcher=launcher,
                   script=[Path(__file__).parent / "stream_probe.py", "align.py"],
                   env={"ACCELERATE_USE_CPU": "1", "STREAM_PROBE_DIR": str(tmp_path)})
    seen = {rank: [line.split() for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()] for rank in "01"}
    keys = Counter(key for rank in seen.values() for key, _ in rank)
    assert sorted(keys) == sorted(demo_keys(demo, modality))
    assert set(keys.values()) == {1}, [key for key, count in keys.items() if count > 1]
    shards = {rank: {Path(url).name for _, url in rows} for rank, rows in seen.items()}
    assert len(shards["0"]) == len(shards["1"]) == 2 and not shards["0"] & shards["1"], shards
    digests = re.findall(r"rank (\d): digest of the trainable weights (\w+)", result.stdout)
    assert sorted(rank for rank, _ in digests) == ["0", "1"] and digests[0][1] == digests[1][1], result.stdout


@on_modalities("video")
def test_a_killed_demo_stream_resumes_at_the_same_sample_and_ends_bit_identical(demo, modality, tmp_path):
    # 8 steps of 4 samples from 2 workers over 24 samples: the stream runs out at step 6 and starts its second pass
    arguments = ["--dataset_config", modality, "--max_steps", "8", "--save_steps", "2", "--dataloader_num_workers", "2"]
    straight = align(demo, tmp_path / "straight", *arguments)
    assert "rank 0: trained on 32 streamed samples, skipped 0" in straight.stdout
    assert "'samples_per_second'" in straight.stdout + straight.stderr

    command = [sys.executable, EXAMPLES / "align.py", "--model_name_or_path", demo["base"], "--dataset_name",
               demo["shards"], "--streaming", "--output_dir", tmp_path / "killed", *CPU, *arguments]
    kill_once_written(command, tmp_path / "killed" / "checkpoint-4" / "stream_state_rank0.json",
                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not (tmp_path / "killed" / "checkpoint-8").exists(), "killed too late to test resuming"
    for later in (tmp_path / "killed").glob("checkpoint-6"):  # written before the kill landed: as if cut short
        (later / "stream_state_rank0.json").unlink(missing_ok=True)

    resumed = align(demo, tmp_path / "killed", *arguments, "--resume_from_checkpoint", "last")
    assert "Resuming from " + str(tmp_path / "killed" / "checkpoint-4") in resumed.stderr
    assert "rank 0: trained on 32 streamed samples" in resumed.stdout  # 16 before the kill, 16 after
    expected, got = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert expected.keys() == got.keys()
    trained = [key for key in expected if f".projectors.{modality}." in key]
    assert trained and not [key for key in trained if not torch.equal(expected[key], got[key])]
    base = load_file(Path(demo["base"]) / "model.safetensors")
    assert not all(torch.equal(base[key], got[key]) for key in trained), "the projector did not train"

    refused = align(demo, tmp_path / "killed", *arguments[:-1], "1", "--resume_from_checkpoint",
                    tmp_path / "killed" / "checkpoint-4", check=False)
    assert refused.returncode != 0 and "resume with --dataloader_num_workers 2 (got 1)" in refused.stderr


@on_modalities("image")
def test_two_ranks_cache_disjoint_demo_shards_and_alignment_streams_the_cache_at_the_on_the_fly_loss(
        demo, modality, tmp_path):
    from transformers import AutoModelForMultimodalLM

    from transformers_anymal.training_anymal import load_dataset_dict

    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0")
    cache(demo, tmp_path / "cache", "--dataset_config", modality, "--num_workers", "1", launcher=launcher,
          env={"ACCELERATE_USE_CPU": "1"})
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["splits"]["train"]["rows"] == 24
    keys, shard_of = cached_keys(tmp_path / "cache" / "train"), demo_keys(demo, modality)
    by_rank = {rank: {shard_of[key] for name, shard in keys.items() if name.startswith(rank) for key in shard}
               for rank in ("00000", "00001")}
    assert len(by_rank["00000"]) == len(by_rank["00001"]) == 2 and not by_rank["00000"] & by_rank["00001"], by_rank
    assert sorted(key for shard in keys.values() for key in shard) == sorted(shard_of)

    raw = {row["__key__"]: row for row in load_streaming_dataset(demo["shards"], modality)["train"]}
    cached = {row["__key__"]: row for row in load_dataset_dict(tmp_path / "cache", streaming=True)["train"]}
    picked = sorted(raw)[::3]
    collator = AnyMALDataCollator(AutoProcessor.from_pretrained(demo["base"]))
    on_the_fly, from_cache = collator([raw[key] for key in picked]), collator([cached[key] for key in picked])
    assert "encoder_features" in from_cache and not {"pixel_values", "pixel_values_videos", "input_features",
                                                     "imu_values"} & set(from_cache)
    assert torch.equal(on_the_fly["labels"], from_cache["labels"])
    model = AutoModelForMultimodalLM.from_pretrained(demo["base"]).eval()
    with torch.no_grad():
        assert torch.allclose(model(**on_the_fly).loss, model(**from_cache).loss, rtol=1e-5)

    align(demo, tmp_path / "aligned", "--max_steps", "2", "--dataloader_num_workers", "1", shards=tmp_path / "cache")
    aligned = load_file(tmp_path / "aligned" / "model.safetensors")
    base = load_file(Path(demo["base"]) / "model.safetensors")
    changed = {key for key in base if not torch.equal(base[key], aligned[key])}
    assert changed and {key.split(".")[2] for key in changed} == {modality}, changed
