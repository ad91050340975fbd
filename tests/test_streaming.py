"""Streaming training data: WebDataset shards as chats, disjoint shards per rank, exact resume, corrupt samples."""

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from transformers_anymal import AnyMALDataCollator
from transformers_anymal.streaming_anymal import load_streaming_dataset

from anymal_tester import TINY, make_webdataset_shards, tiny_model, write_video
from child_process import run


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
                                   {"role": "assistant", "content": "caption of sample 000000000"}]
    assert rows[3]["messages"][0]["content"][-1]["text"] == "What is it?"  # the chat of the sample's .json
    processor = AutoProcessor.from_pretrained(TINY)
    batch = AnyMALDataCollator(processor)(rows)
    assert batch["input_features"].shape[0] == batch["pixel_values_videos"].shape[0] == 4

    clip = write_video(tmp_path / "clip.mp4", gray_levels=tuple(range(0, 200, 10)))  # a clip's bytes sample as its file
    from_bytes = processor(text=f"{processor.video_token}", videos=[Path(clip).read_bytes()], return_tensors="pt")
    from_file = processor(text=f"{processor.video_token}", videos=[clip], return_tensors="pt")
    assert torch.equal(from_bytes["pixel_values_videos"], from_file["pixel_values_videos"])


def test_a_killed_streaming_run_resumes_at_the_same_sample_and_ends_bit_identical(setup, tmp_path):
    # 8 steps of 4 samples from 2 workers over 24 samples: the stream runs out at step 6 and starts its second pass
    arguments = ["--max_steps", "8", "--save_steps", "2", "--dataloader_num_workers", "2"]
    straight = align(setup, tmp_path / "straight", *arguments)
    assert "rank 0: trained on 32 streamed samples, skipped 0" in straight.stdout
    assert "'samples_per_second'" in straight.stdout + straight.stderr

    command = [sys.executable, EXAMPLES / "align.py", "--model_name_or_path", setup["base"], "--dataset_name",
               setup["shards"], "--streaming", "--output_dir", tmp_path / "killed", *CPU, *arguments]
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-4" / "stream_state_rank0.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before checkpoint-4"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "checkpoint-8").exists(), "killed too late to test resuming"
    for later in (tmp_path / "killed").glob("checkpoint-6"):  # written before the kill landed: as if cut short
        (later / "stream_state_rank0.json").unlink(missing_ok=True)

    resumed = align(setup, tmp_path / "killed", *arguments, "--resume_from_checkpoint", "last")
    assert "Resuming from " + str(tmp_path / "killed" / "checkpoint-4") in resumed.stderr
    assert "rank 0: trained on 32 streamed samples" in resumed.stdout  # 16 before the kill, 16 after
    expected, got = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert expected.keys() == got.keys()
    changed = [key for key in expected if ".projectors." in key and not torch.equal(expected[key], got[key])]
    assert not changed, changed

    refused = align(setup, tmp_path / "killed", *arguments[:-1], "1", "--resume_from_checkpoint",
                    tmp_path / "killed" / "checkpoint-4", check=False)
    assert refused.returncode != 0 and "resume with --dataloader_num_workers 2 (got 1)" in refused.stderr


def test_two_ranks_read_disjoint_shards_see_every_sample_once_and_stay_identical(setup, tmp_path):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0")
    # one pass: 24 samples over 2 ranks in batches of 4 is 3 steps
    result = align(setup, tmp_path / "out", "--max_steps", "3", "--dataloader_num_workers", "1", launcher=launcher,
                   script=[Path(__file__).parent / "stream_probe.py", "align.py"],
                   env={"ACCELERATE_USE_CPU": "1", "STREAM_PROBE_DIR": str(tmp_path)})
    seen = {rank: [line.split() for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()] for rank in "01"}
    keys = Counter(key for rank in seen.values() for key, _ in rank)
    assert sorted(keys) == [f"{shard:05d}{position:04d}" for shard in range(4) for position in range(6)]
    assert set(keys.values()) == {1}, [key for key, count in keys.items() if count > 1]
    shards = {rank: {Path(url).name for _, url in rows} for rank, rows in seen.items()}
    assert len(shards["0"]) == len(shards["1"]) == 2 and not shards["0"] & shards["1"], shards
    digests = re.findall(r"rank (\d): digest of the trainable weights (\w+)", result.stdout)
    assert sorted(rank for rank, _ in digests) == ["0", "1"] and digests[0][1] == digests[1][1], result.stdout


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
    import json

    run([sys.executable, EXAMPLES / "eval_anymal.py", "--model_name_or_path", setup["base"], "--dataset_name",
         setup["shards"], "--streaming", "--split", "train", "--output_dir", tmp_path, "--max_new_tokens", "2",
         "--batch_size", "5"], timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    references = [sample["references"][0] for sample in json.loads((tmp_path / "report.json").read_text())["samples"]]
    keys = [f"{shard:05d}{position:04d}" for shard in range(4) for position in range(6)]
    assert references == [f"{'sample' if key.endswith('3') else 'caption of sample'} {key}" for key in keys]
