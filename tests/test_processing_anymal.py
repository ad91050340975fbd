import logging

import numpy as np
import pytest
import soxr
import torch
from PIL import Image
from transformers import AutoProcessor

from transformers_anymal import AnyMALIMUFeatureExtractor, AnyMALProcessor

from anymal_tester import TINY, tiny_model, write_audio, write_image, write_video


@pytest.fixture(scope="module")
def processor() -> AnyMALProcessor:
    return AutoProcessor.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    return {"image": write_image(folder / "digit.png"), "audio": write_audio(folder / "voice.wav"),
            "video": write_video(folder / "clip.mp4"), "folder": folder}


def imu_recording(seconds=3, rate=100, seed=0):
    return np.random.default_rng(seed).standard_normal((6, seconds * rate))


def chat(*blocks, text="What is going on?", system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]


def test_auto_processor_loads_every_sub_processor(processor):
    assert type(processor).__name__ == "AnyMALProcessor"
    assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor")
    assert type(processor.video_processor).__name__ == "AnyMALVideoProcessor"
    assert type(processor.feature_extractor).__name__ == "ClapFeatureExtractor"
    assert isinstance(processor.imu_feature_extractor, AnyMALIMUFeatureExtractor)
    assert processor.num_tokens == {"image": 8, "video": 8, "audio": 4, "imu": 4}


def test_save_and_load_round_trips_every_sub_processor(processor, tmp_path):
    processor.imu_feature_extractor.mean = [0.5] * 6  # a non-default value must survive
    try:
        processor.save_pretrained(tmp_path)
        reloaded = AutoProcessor.from_pretrained(tmp_path)
    finally:
        processor.imu_feature_extractor.mean = None
    assert reloaded.imu_feature_extractor.mean == [0.5] * 6
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.video_processor.num_frames == processor.video_processor.num_frames
    assert reloaded.feature_extractor.truncation == processor.feature_extractor.truncation
    assert reloaded.image_processor.crop_size == processor.image_processor.crop_size
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_chat_with_all_four_modalities_generates(processor, model, media):
    messages = chat({"type": "image", "path": media["image"]}, {"type": "video", "path": media["video"]},
                    {"type": "audio", "path": media["audio"]},
                    {"type": "imu", "imu": imu_recording(), "sampling_rate": 100}, system="Answer briefly.")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    assert inputs["input_features"].shape[:2] == (1, 1)
    assert inputs["imu_values"].shape == (1, 6, 1000)
    ids = inputs["input_ids"][0]
    for name, count in processor.num_tokens.items():
        assert int((ids == getattr(processor, f"{name}_token_id")).sum()) == count
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[0] + 4


def test_chat_template_is_llama_2_chat(processor):
    messages = chat({"type": "image", "url": "unused.png"}, text="Hi", system="Be brief.")
    messages += [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nHi [/INST] Hello. </s><s>[INST] Again? [/INST]"


def test_tiny_config_carries_the_package_template(processor):
    from transformers_anymal.processing_anymal import llama2_chat_template

    # hub_configs/anymal-tiny is regenerated, not edited by hand
    assert processor.chat_template == llama2_chat_template(processor.modalities)


def test_assistant_mask_covers_only_the_answers(processor, media):
    messages = chat({"type": "image", "path": media["image"]}, text="Digit?")
    messages += [{"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Sure?"},
                 {"role": "assistant", "content": "Yes."}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True, return_tensors="pt")
    ids, mask = inputs["input_ids"][0], inputs["assistant_masks"][0].bool()
    # every answer token is in the mask, the one carrying the space before the answer too
    assert processor.tokenizer.decode(ids[mask]) == " Seven. </s> Yes. </s>"
    assert not mask[ids == processor.image_token_id].any()


def test_batch_with_different_modality_sets_matches_one_by_one(processor, model, media):
    chats = [
        chat({"type": "imu", "imu": imu_recording(), "sampling_rate": 100}, {"type": "image", "path": media["image"]}),
        chat(text="Just text, please."),
        chat({"type": "audio", "path": media["audio"]}, {"type": "audio", "path": media["audio"]}),
    ]
    batch = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "input_features", "imu_values"}
    assert (batch["attention_mask"][:, 0] == 0).any(), "decoder-only batches are left-padded"
    batched = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:]
    for index, messages in enumerate(chats):
        alone = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        assert torch.equal(model.generate(**alone, max_new_tokens=5, do_sample=False)[0, -5:], batched[index])


def test_only_the_modalities_present_are_returned(processor):
    inputs = processor(text=["plain text", "more plain text"], return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}


def test_padding_side_is_configurable(processor):
    left = processor(text=["a", "a longer text"], return_tensors="pt")
    right = processor(text=["a", "a longer text"], padding_side="right", return_tensors="pt")
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0


def test_each_placeholder_becomes_a_run_of_tokens_in_order(processor, media):
    inputs = processor(text="<imu> then <image> then <imu>", images=media["image"],
                       imu=[imu_recording(seed=1), imu_recording(seed=2)], imu_sampling_rate=100, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    runs = [(token, len(list(group))) for token, group in __import__("itertools").groupby(ids)
            if token >= processor.image_token_id]
    assert runs == [(processor.imu_token_id, 4), (processor.image_token_id, 8), (processor.imu_token_id, 4)]
    assert inputs["imu_values"].shape[0] == 2


def test_items_given_per_sample_are_checked_per_sample(processor, media):
    texts = ["<image> one", "two, no image"]
    processor(text=texts, images=[[media["image"]], []], return_tensors="pt")  # fine
    with pytest.raises(ValueError, match=r"sample 1 has 0 <image> placeholder\(s\) but 1 images were given"):
        processor(text=texts, images=[[media["image"]], [media["image"]]], return_tensors="pt")
    with pytest.raises(ValueError, match=r"the texts \(\[1, 0\] per sample\) hold 1 <image> placeholder\(s\) but 2"):
        processor(text=texts, images=[media["image"], media["image"]], return_tensors="pt")
    with pytest.raises(ValueError, match=r"sample 0 has 1 <image> placeholder\(s\) but no images were given"):
        processor(text=texts, return_tensors="pt")


def test_items_without_placeholders_are_rejected(processor, media):
    with pytest.raises(ValueError, match="hold 0 <image> placeholder.* write one <image> where each item belongs"):
        processor(text="Describe this.", images=media["image"], return_tensors="pt")


def test_audio_is_resampled_to_the_feature_extractors_rate(processor):
    rate = processor.feature_extractor.sampling_rate
    waveform = np.sin(np.linspace(0, 800 * np.pi, 16000)).astype(np.float32)  # 1 s at 16 kHz
    at_16k = processor(text="<audio>", audio=waveform, sampling_rate=16000, return_tensors="pt")["input_features"]
    resampled = soxr.resample(waveform, 16000, rate).astype(np.float32)
    at_48k = processor(text="<audio>", audio=resampled, sampling_rate=rate, return_tensors="pt")["input_features"]
    assert torch.allclose(at_16k, at_48k)
    taken_as_48k = processor(text="<audio>", audio=waveform, sampling_rate=rate, return_tensors="pt")["input_features"]
    assert not torch.allclose(at_16k, taken_as_48k)
    with pytest.raises(ValueError, match="audio 0: .*no sampling rate"):
        processor(text="<audio>", audio=waveform, return_tensors="pt")


@pytest.mark.parametrize("settings", [{"truncation": "rand_trunc", "padding": "repeatpad"},  # the tiny checkpoint's
                                      {"truncation": "fusion", "padding": "repeatpad"},  # CLAP's own
                                      {"truncation": "fusion", "padding": "repeat"},
                                      {"truncation": "rand_trunc", "padding": "pad"}])
def test_audio_features_are_clap_feature_extractors_to_float32_precision(processor, settings, monkeypatch):
    """The processor computes CLAP's log-mel batched over clips and frames, without calling the extractor (which
    transforms one frame at a time), except for a clip it must crop at random."""
    from transformers import ClapFeatureExtractor

    extractor = ClapFeatureExtractor(sampling_rate=16_000, max_length_s=2, fft_window_size=400,
                                     hop_length=160, frequency_max=8000, **settings)
    fast = AnyMALProcessor(processor.image_processor, processor.video_processor, extractor,
                           processor.imu_feature_extractor, processor.tokenizer, num_tokens=processor.num_tokens)
    rng = np.random.default_rng(0)
    clips = [0.3 * rng.standard_normal(length).astype(np.float32)
             for length in (32_000, 20_000, 401, 3_333, *[5_000] * 9)]  # the window, shorter, one frame; 13 clips
    clips[3][:] = 0  # silence: every band at the floor
    expected = extractor(clips, sampling_rate=16_000, return_tensors="pt")["input_features"]
    calls = []
    monkeypatch.setattr(ClapFeatureExtractor, "__call__", lambda *args, _call=ClapFeatureExtractor.__call__, **kwargs:
                        calls.append(1) or _call(*args, **kwargs))
    features = fast(text="<audio>" * len(clips), audio=clips, sampling_rate=16_000, return_tensors="pt")["input_features"]
    assert not calls
    assert features.dtype == expected.dtype and features.shape == expected.shape
    assert (features - expected).abs().max() < 1e-4
    if settings["truncation"] == "fusion":  # a clip longer than the window: the extractor's random crops, as before
        longer = [0.3 * rng.standard_normal(40_000).astype(np.float32)]
        np.random.seed(0)
        expected = extractor(longer, sampling_rate=16_000, return_tensors="pt")["input_features"]
        np.random.seed(0)
        assert torch.equal(fast(text="<audio>", audio=longer, sampling_rate=16_000, return_tensors="pt")["input_features"],
                           expected)
        assert calls


def test_video_frames_are_sampled_uniformly_over_the_clip(processor, media):
    levels = list(range(0, 240, 12))  # frame i is gray level 12 * i; 20 frames at 10 fps
    frames = processor.video_processor(media["video"], do_normalize=False, do_rescale=False,
                                       return_tensors="pt")["pixel_values_videos"][0]
    expected = [levels[i] for i in (2, 7, 12, 17)]  # the middle of each quarter of the clip
    assert np.allclose(frames.float().mean((1, 2, 3)).numpy(), expected, atol=6)


class CountingContainer:
    """A PyAV container that counts the frames its packets decode."""

    def __init__(self, container):
        self.container, self.decoded = container, 0

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.container.close()

    def __getattr__(self, name):
        return getattr(self.container, name)

    def demux(self, *streams):
        for packet in self.container.demux(*streams):
            yield CountingPacket(packet, self)


class CountingPacket:
    def __init__(self, packet, container):
        self.packet, self.container = packet, container

    def __getattr__(self, name):
        return getattr(self.packet, name)

    def decode(self):
        frames = self.packet.decode()
        self.container.decoded += len(frames)
        return frames


def test_video_files_decode_only_around_the_sampled_frames_and_give_load_videos_frames(tmp_path, monkeypatch):
    import av
    from transformers.video_utils import load_video

    from transformers_anymal.video_processing_anymal import read_sampled_frames

    # H.264 (libx264) with a keyframe every 12 frames: 60 frames, each its own gray level
    levels = [(37 * index) % 256 for index in range(60)]
    path = write_video(tmp_path / "clip.mp4", gray_levels=levels, codec="libx264", keyframe_interval=12)
    video_processor = AutoProcessor.from_pretrained(TINY).video_processor
    loaded = {}
    for options in ({"num_frames": 8}, {"num_frames": 3}, {"fps": 2}):
        def sample(metadata, options=options, **kwargs):
            return video_processor.sample_frames(metadata, **options)

        frames, metadata = read_sampled_frames(path, sample)
        expected, expected_metadata = loaded[str(options)] = load_video(path, backend="pyav", sample_indices_fn=sample)
        assert np.array_equal(frames, expected), options  # bit for bit
        assert list(metadata.frames_indices) == list(expected_metadata.frames_indices)
        assert np.allclose(frames.mean((1, 2, 3)), [levels[i] for i in metadata.frames_indices], atol=3)
        assert (metadata.total_num_frames, metadata.fps) == (60, 10.0)

    # load_video decodes every frame up to the last sampled one (57 of 60 for 8 frames); this reader far fewer
    opened = []
    open_file = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(CountingContainer(open_file(*args, **kwargs)))
                        or opened[-1])
    frames, metadata = read_sampled_frames(path, lambda metadata, **kwargs: video_processor.sample_frames(metadata, 8))
    assert metadata.frames_indices[-1] == 56 and np.array_equal(frames, loaded[str({"num_frames": 8})][0])
    assert opened[0].decoded < 2 / 3 * 57, opened[0].decoded


def test_video_urls_decode_like_their_files(processor, media, monkeypatch):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from transformers_anymal import video_processing_anymal

    reads, read = [], video_processing_anymal.read_sampled_frames
    monkeypatch.setattr(video_processing_anymal, "read_sampled_frames", lambda *args: reads.append(args) or read(*args))

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(media["folder"]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
        from_url = processor(text="<video>", videos=url, return_tensors="pt")["pixel_values_videos"]
        from_file = processor(text="<video>", videos=media["video"], return_tensors="pt")["pixel_values_videos"]
        assert torch.equal(from_url, from_file) and len(reads) == 2  # both through the seeking reader
        with pytest.raises(ValueError, match=r"video: cannot decode .*missing\.mp4.*404"):
            processor(text="<video>", videos=url.replace("clip", "missing"), return_tensors="pt")
    finally:
        server.shutdown()


def test_video_files_shorter_than_num_frames_repeat_frames_as_arrays_do(processor, tmp_path):
    path = write_video(tmp_path / "three.mp4", gray_levels=(0, 100, 200))
    frames = processor.video_processor(path, do_normalize=False, do_rescale=False,
                                       return_tensors="pt")["pixel_values_videos"][0]
    assert frames.shape == (4, 3, 32, 32)  # num_frames, as for a 3-frame array (below)
    assert np.allclose(frames.float().mean((1, 2, 3)).numpy(), [0, 100, 100, 200], atol=6)  # frames 0, 1, 1, 2


def test_video_files_whose_container_does_not_count_frames_decode(processor, tmp_path):
    path = write_video(tmp_path / "clip.mkv")  # Matroska stores no frame count
    frames = processor.video_processor(path, do_normalize=False, do_rescale=False,
                                       return_tensors="pt")["pixel_values_videos"][0]
    assert np.allclose(frames.float().mean((1, 2, 3)).numpy(), [24, 84, 144, 204], atol=6)  # as the mp4 above


def test_video_arrays_are_sampled_to_num_frames(processor):
    clip = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)  # shorter than num_frames
    assert processor(text="<video>", videos=clip, return_tensors="pt")["pixel_values_videos"].shape == (1, 4, 3, 32, 32)


# IMU feature extractor


def test_imu_layout_resampling_and_window(processor):
    extractor = processor.imu_feature_extractor
    recording = imu_recording(seconds=3, rate=100)
    channels_first = extractor(recording, sampling_rate=100, return_attention_mask=True)
    time_first = extractor(recording.T, sampling_rate=100, return_attention_mask=True)
    assert np.array_equal(channels_first["imu_values"], time_first["imu_values"])
    assert channels_first["imu_values"].shape == (1, 6, 1000)
    assert channels_first["imu_mask"][0].sum() == 600  # 3 s at 200 Hz, the rest zero-padded
    window = channels_first["imu_values"][0, :, :600]
    assert np.allclose(window.mean(1), 0, atol=1e-5) and np.allclose(window.std(1), 1, atol=1e-3)


def test_imu_files(processor, tmp_path):
    recording = imu_recording()
    np.save(tmp_path / "walk.npy", recording)
    np.savetxt(tmp_path / "walk.csv", recording.T, delimiter=",", header="ax,ay,az,gx,gy,gz", comments="")
    from_npy = processor(text="<imu>", imu=str(tmp_path / "walk.npy"), imu_sampling_rate=100, return_tensors="pt")["imu_values"]
    from_csv = processor(text="<imu>", imu=str(tmp_path / "walk.csv"), imu_sampling_rate=100, return_tensors="pt")["imu_values"]
    assert torch.allclose(from_npy, from_csv, atol=1e-5)


def test_long_imu_recordings_are_cropped_with_a_warning(processor, caplog):
    with caplog.at_level(logging.WARNING):
        values = processor.imu_feature_extractor(imu_recording(seconds=8, rate=200), sampling_rate=200)["imu_values"]
    assert values.shape == (1, 6, 1000) and "longer than the 5 s window" in caplog.text


# Bad input: a ValueError/TypeError naming the item, its modality and the fix


@pytest.mark.parametrize(
    "recording, rate, message",
    [
        (np.random.randn(3, 400), 100, r"imu 0: shape \(3, 400\) has no dimension of 6 channels"),
        (np.where(np.arange(600).reshape(6, 100) == 250, np.nan, 1.0), 100, "imu 0: 1 time steps hold NaN"),
        (np.random.randn(6, 50), 100, "imu 0: 50 samples at 100 Hz last 0.5 s, shorter than the 1 s minimum"),
        (np.random.randn(6, 400), None, "imu 0: no sampling rate"),
    ],
)
def test_bad_imu_recordings(processor, recording, rate, message):
    with pytest.raises(ValueError, match=message):
        processor(text="<imu>", imu=recording, imu_sampling_rate=rate, return_tensors="pt")


def test_corrupt_and_empty_media_name_the_item(processor, media):
    folder = media["folder"]
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEnot audio")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    with pytest.raises(ValueError, match="image 1: cannot read .*broken.png"):
        processor(text="<image><image>", images=[media["image"], str(folder / "broken.png")], return_tensors="pt")
    with pytest.raises(ValueError, match="audio 0: cannot read .*broken.wav"):
        processor(text="<audio>", audio=str(folder / "broken.wav"), return_tensors="pt")
    with pytest.raises(ValueError, match="audio 0: .*non-empty mono waveform"):
        processor(text="<audio>", audio=np.zeros(0, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
    with pytest.raises(ValueError, match="video: cannot decode .*broken.mp4"):
        processor(text="<video>", videos=str(folder / "broken.mp4"), return_tensors="pt")
    with pytest.raises(ValueError, match="video 0: the clip has no frames"):
        processor(text="<video>", videos=np.zeros((0, 32, 32, 3), dtype=np.uint8), return_tensors="pt")
    with pytest.raises(TypeError, match="image 0: int is not a image input"):
        processor(text="<image>", images=[3], return_tensors="pt")


def test_bad_chat_blocks(processor):
    with pytest.raises(ValueError, match=r"message 0, block 0: unknown content type 'smell'"):
        processor.apply_chat_template(chat({"type": "smell", "smell": "roses"}), tokenize=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"block 0: a audio array needs 'sampling_rate'"):
        processor.apply_chat_template(chat({"type": "audio", "audio": np.zeros(100)}), tokenize=True, return_tensors="pt")


@pytest.mark.parametrize("content, message", [
    (None, r"conversation 0, message 0: no `content` \(or None\)"),
    ([{"type": "text", "text": None}], r"message 0, block 0: a text block needs a string 'text', got NoneType"),
])
def test_chats_that_would_render_none_are_refused(processor, content, message):
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True, return_tensors="pt")


def test_malformed_chats_and_media_are_named_not_crashed_on(processor, tmp_path):
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:100])
    cases = [
        (chat({"type": "image", "image": np.zeros((0, 10, 3), dtype=np.uint8)}), r"image 0: .*the image is empty"),
        (chat({"type": "image", "image": Image.new("RGB", (0, 5))}), r"image 0: .*the image is empty"),
        (chat({"type": "image", "image": Image.open(truncated)}), r"image 0: cannot read .*truncated"),
        ([{"role": "user", "content": "hi \ud800"}], r"text 0: '\\ud800' at position \d+ is not valid Unicode"),
        ([{"role": "user", "content": ["hello"]}], r"message 0, block 0: a content block is a dict"),
        ([{"role": "tool", "content": "x"}], r"message 0: role 'tool'; this template takes system, user, assistant"),
        ([], r"apply_chat_template got no messages"),
        ([[{"role": "user", "content": "hi"}], []], r"conversation 1 has no messages"),
    ]
    for conversation, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")


def test_blocks_with_keys_holding_none_as_datasets_writes_them(processor):
    image = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    plain = processor.apply_chat_template(chat({"type": "image", "image": image}), tokenize=True, return_dict=True, return_tensors="pt")
    padded = processor.apply_chat_template(chat({"type": "image", "image": image, "url": None, "path": None}),
                                           tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(padded["pixel_values"], plain["pixel_values"])


def test_tokenizer_without_any_placeholder_is_rejected(processor):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = processor.tokenizer.backend_tokenizer.to_str()
    for name in ("image", "video", "audio", "imu"):
        state = state.replace(f"<{name}>", f"<other {name}>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state), unk_token="<unk>")
    with pytest.raises(ValueError, match=r"The tokenizer has none of the placeholders .*add those of the model's"):
        AnyMALProcessor(processor.image_processor, processor.video_processor, processor.feature_extractor,
                        processor.imu_feature_extractor, tokenizer)


def test_cached_encoder_features_stand_in_for_media(processor, media):
    from transformers_anymal import EncoderFeatures

    features = EncoderFeatures(np.zeros((17, 32), dtype=np.float32))
    inputs = processor(text="<image> cached", images=[features], return_tensors="pt")
    assert "pixel_values" not in inputs and inputs["encoder_features"]["image"].shape == (1, 17, 32)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 8
    with pytest.raises(ValueError, match="image: mix of raw items and EncoderFeatures"):
        processor(text="<image><image>", images=[features, media["image"]], return_tensors="pt")


def test_decoding_hooks(processor):
    ids = processor(text=["the person is running"], return_tensors="pt")["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["the person is running"]
    assert processor.post_process_image_text_to_text(ids) == ["the person is running"]


def test_pil_images_and_arrays(processor):
    image = Image.new("RGB", (20, 30), color=(255, 0, 0))
    from_pil = processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]
    from_array = processor(text="<image>", images=np.array(image), return_tensors="pt")["pixel_values"]
    assert torch.allclose(from_pil, from_array)


def test_grayscale_arrays_are_images(processor):
    gray = np.random.default_rng(0).integers(0, 256, (30, 20), dtype=np.uint8)
    from_array = processor(text="<image>", images=gray, return_tensors="pt")["pixel_values"]
    as_pil = processor(text="<image>", images=Image.fromarray(gray), return_tensors="pt")["pixel_values"]  # PIL's "L", made RGB
    assert from_array.shape == as_pil.shape and torch.allclose(from_array, as_pil)


# What each value type means: integer PCM, 16-bit and float images are brought to the scale the encoders expect


def test_integer_pcm_audio_is_scaled_to_the_float_range(processor):
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32768, 48_000, dtype=np.int16)
    as_int = processor(text="<audio>", audio=pcm, sampling_rate=48_000, return_tensors="pt")["input_features"]
    as_float = processor(text="<audio>", audio=pcm / 32768, sampling_rate=48_000, return_tensors="pt")["input_features"]
    assert torch.allclose(as_int, as_float, atol=1e-4)
    unsigned = (pcm.astype(np.int32) // 256 + 128).astype(np.uint8)  # 8-bit WAV: unsigned, centred on 128
    as_uint8 = processor(text="<audio>", audio=unsigned, sampling_rate=48_000, return_tensors="pt")["input_features"]
    expected = processor(text="<audio>", audio=(unsigned / 128 - 1), sampling_rate=48_000, return_tensors="pt")["input_features"]
    assert torch.allclose(as_uint8, expected, atol=1e-4)
    as_list = processor(text="<audio>", audio=(pcm / 32768).tolist(), sampling_rate=48_000, return_tensors="pt")["input_features"]
    assert torch.allclose(as_list, as_float, atol=1e-4)  # a Python list of samples is one waveform
    with pytest.raises(ValueError, match=r"audio 0: .*float samples reach 3\d{4}.*divide 16-bit PCM stored as floats"):
        processor(text="<audio>", audio=pcm.astype(np.float32), sampling_rate=48_000, return_tensors="pt")


def test_audio_longer_than_the_window_keeps_its_middle_the_same_every_time(processor, caplog):
    rng = np.random.default_rng(0)
    long = rng.uniform(-1, 1, 48_000 * 14).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        first = processor(text="<audio>", audio=long, sampling_rate=48_000, return_tensors="pt")["input_features"]
    second = processor(text="<audio>", audio=long, sampling_rate=48_000, return_tensors="pt")["input_features"]
    middle = processor(text="<audio>", audio=long[2 * 48_000 : 12 * 48_000], sampling_rate=48_000, return_tensors="pt")["input_features"]
    assert torch.equal(first, second) and torch.equal(first, middle)
    assert "longer than the encoder's 10 s window; keeping its middle" in caplog.text


def test_16_bit_and_float_images_mean_what_8_bit_ones_do(processor, tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the encoder's size: no resampling
    expected = processor(text="<image>", images=eight, return_tensors="pt")["pixel_values"]
    sixteen = eight.astype(np.uint16) * 257
    assert torch.allclose(processor(text="<image>", images=sixteen, return_tensors="pt")["pixel_values"], expected, atol=1e-5)
    unit = eight.astype(np.float32) / 255
    assert torch.allclose(processor(text="<image>", images=unit, return_tensors="pt")["pixel_values"], expected, atol=1e-5)
    assert torch.allclose(processor(text="<image>", images=torch.from_numpy(unit), return_tensors="pt")["pixel_values"], expected, atol=1e-5)
    gray = eight[..., 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # a 16-bit grayscale PNG
    with Image.open(tmp_path / "sixteen.png") as png:
        assert png.mode.startswith("I")
        from_png = processor(text="<image>", images=png, return_tensors="pt")["pixel_values"]
    assert torch.allclose(from_png, processor(text="<image>", images=gray, return_tensors="pt")["pixel_values"], atol=1e-5)
    as_32_bit = Image.fromarray(gray.astype(np.int32) * 257)  # how PIL reads some 16-bit files: mode "I"
    assert as_32_bit.mode == "I"
    assert torch.allclose(processor(text="<image>", images=as_32_bit, return_tensors="pt")["pixel_values"], from_png, atol=1e-5)


@pytest.mark.parametrize("image, error, message", [
    (np.full((8, 8, 3), 200.0, dtype=np.float32), ValueError, r"float pixel values span 200..200; .* divide 0-255"),
    (np.full((8, 8, 3), np.nan, dtype=np.float32), ValueError, "NaN or infinite"),
    (np.full((8, 8, 3), 300, dtype=np.int64), ValueError, r"int64 pixel values span 300..300"),
    (np.ones((8, 8, 3), dtype=np.complex64), TypeError, "complex values"),
])
def test_images_whose_scale_cannot_be_known_are_refused(processor, image, error, message):
    with pytest.raises(error, match=f"image 0: .*{message}" if error is ValueError else message):
        processor(text="<image>", images=image, return_tensors="pt")


def test_video_frames_follow_the_image_rules(processor):
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    expected = processor(text="<video>", videos=frames, return_tensors="pt")["pixel_values_videos"]
    unit = processor(text="<video>", videos=frames.astype(np.float32) / 255, return_tensors="pt")["pixel_values_videos"]
    assert torch.allclose(unit, expected, atol=1e-5)
    broken = frames.astype(np.float32) / 255
    broken[3, 5, 5] = np.nan
    with pytest.raises(ValueError, match="video 0: .*NaN or infinite"):
        processor(text="<video>", videos=broken, return_tensors="pt")


@pytest.mark.parametrize("arguments, error, message", [
    ({"text": "<audio>", "audio": np.ones(48_000, dtype=np.complex64), "sampling_rate": 48_000}, TypeError,
     "audio 0: complex values"),
    ({"text": "<imu>", "imu": np.ones((6, 300), dtype=np.complex128), "imu_sampling_rate": 100}, TypeError,
     "imu 0: complex values"),
    ({"text": "<audio>", "audio": np.array([0.5], dtype=np.float32), "sampling_rate": 48_000}, ValueError,
     r"audio 0: 1 samples at 48000 Hz are shorter than one analysis window \(1024 samples"),
    ({"text": "<imu>", "imu": np.zeros(600), "imu_sampling_rate": 100}, ValueError,
     r"imu: an array of shape \(600,\) is neither one imu \(2-D\) nor a stack of them \(3-D\)"),
    ({"text": "<video>", "videos": np.zeros((32, 64, 64), dtype=np.uint8)}, ValueError,
     r"videos: an array of shape \(32, 64, 64\) is neither one video \(4-D\) nor a stack of them \(5-D\)"),
])
def test_arrays_that_are_not_items_are_named_as_such(processor, arguments, error, message):
    with pytest.raises(error, match=message):
        processor(**arguments)


def test_placeholders_typed_in_chat_text_cannot_make_or_take_a_media_slot(processor, media):
    image_chat = chat({"type": "image", "path": media["image"]}, text="What is <image> in HTML?")
    with pytest.raises(ValueError, match=r"message 0, block 1: the text holds <image>, the placeholder of a media slot"):
        processor.apply_chat_template(image_chat, tokenize=True, return_dict=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"message 0: the text holds <audio>"):
        processor.apply_chat_template(chat(text="hi", system="Answer about <audio>"), tokenize=True, return_tensors="pt")
    # the keyword form writes placeholders in the text by design
    assert int((processor(text="<image> what?", images=media["image"], return_tensors="pt")["input_ids"] == processor.image_token_id).sum())


def test_the_imu_feature_extractor_refuses_complex_recordings(processor):
    with pytest.raises(TypeError, match="imu 0: complex values"):
        processor.imu_feature_extractor(np.ones((6, 300), dtype=np.complex64), sampling_rate=100)


def test_serving_engines_get_the_placeholder_count_each_item_takes(processor, media):
    counts = processor._get_num_multimodal_tokens(image_sizes=[[20, 30], [640, 480]], video_sizes=[[16, 64, 64]],
                                                  audio_lengths=[48_000])
    inputs = processor(text="<image><image><video><audio>", images=[Image.new("RGB", (30, 20)), media["image"]],
                       videos=np.zeros((16, 64, 64, 3), dtype=np.uint8),
                       audio=np.zeros(48_000, dtype=np.float32), sampling_rate=48_000, return_tensors="pt")
    for name, key in (("image", "num_image_tokens"), ("video", "num_video_tokens"), ("audio", "num_audio_tokens")):
        per_item = int((inputs["input_ids"] == getattr(processor, f"{name}_token_id")).sum()) // len(counts[key])
        assert counts[key] == [per_item] * len(counts[key]), name
    assert counts["num_image_patches"] == [1, 1] and "num_video_tokens" not in processor._get_num_multimodal_tokens()


def test_saving_leaves_the_processor_as_it_was(tmp_path):
    processor = AutoProcessor.from_pretrained(TINY)
    before = processor.to_dict()
    processor.save_pretrained(tmp_path)
    assert processor.to_dict() == before
    saved = AutoProcessor.from_pretrained(tmp_path)  # the files still carry the auto_map for trust_remote_code
    assert (tmp_path / "processor_config.json").read_text().count('"AutoProcessor"') >= 1
    assert saved.num_tokens == processor.num_tokens


# Keyword routing, as transformers' ProcessorTesterMixin checks it (tests/test_processing_common.py)


def below_zero(values: torch.Tensor) -> bool:
    """Every value negative: what rescale_factor=-1 without normalisation makes of any picture."""
    return values.max().item() < 0


@pytest.mark.parametrize("argument, key", [("images", "pixel_values"), ("videos", "pixel_values_videos")])
def test_flat_image_options_reach_the_image_and_video_processors(processor, media, argument, key):
    text = "<image>" if argument == "images" else "<video>"
    plain = processor(text=text, **{argument: media[argument[:-1]]}, return_tensors="pt")[key]
    flipped = processor(text=text, **{argument: media[argument[:-1]]}, do_rescale=True, rescale_factor=-1.0,
                        do_normalize=False, return_tensors="pt")[key]
    assert not below_zero(plain) and below_zero(flipped)


@pytest.mark.parametrize("argument, key", [("images", "pixel_values"), ("videos", "pixel_values_videos")])
def test_section_options_reach_their_processor_only(processor, media, argument, key):
    text = "<image>" if argument == "images" else "<video>"
    options = {"do_rescale": True, "rescale_factor": -1.0, "do_normalize": False}
    flipped = processor(text=text, **{argument: media[argument[:-1]]}, **{f"{argument}_kwargs": options},
                        return_tensors="pt")[key]
    assert below_zero(flipped)
    other = "videos" if argument == "images" else "images"
    both = processor(text="<image><video>", images=media["image"], videos=media["video"],
                     **{f"{other}_kwargs": options}, return_tensors="pt")
    assert not below_zero(both[key])  # options for the other section leave this one alone


def test_an_option_given_flat_and_in_its_section_raises(processor, media):
    with pytest.raises(ValueError, match="rescale_factor was passed two times"):
        processor(text="<image>", images=media["image"], rescale_factor=-1.0, images_kwargs={"rescale_factor": -1})
    with pytest.raises(ValueError, match="padding was passed two times"):
        processor(text="hello", padding="max_length", text_kwargs={"padding": "do_not_pad"})
    with pytest.raises(ValueError, match="imu_sampling_rate was passed two times"):
        processor(text="<imu>", imu=imu_recording(), imu_sampling_rate=100, imu_kwargs={"sampling_rate": 50})


def test_text_options_reach_the_tokenizer(processor):
    flat = processor(text="hello", padding="max_length", max_length=40, return_tensors="pt")
    nested = processor(text="hello", text_kwargs={"padding": "max_length", "max_length": 40}, return_tensors="pt")
    assert flat["input_ids"].shape == nested["input_ids"].shape == (1, 40)


def test_the_tokenizers_own_padding_defaults_are_kept(processor, tmp_path):
    processor.tokenizer.save_pretrained(tmp_path)
    tokenizer = type(processor.tokenizer).from_pretrained(tmp_path, padding="max_length", max_length=33)
    with_defaults = AnyMALProcessor(processor.image_processor, processor.video_processor, processor.feature_extractor,
                                    processor.imu_feature_extractor, tokenizer, num_tokens=processor.num_tokens)
    assert with_defaults(text="hello", return_tensors="pt")["input_ids"].shape == (1, 33)
    assert processor(text=["a", "a longer text"], return_tensors="pt")["input_ids"].shape[0] == 2  # padded by default


def test_return_tensors_defaults_to_none_as_in_transformers(processor, media):
    inputs = processor(text=["<image> one", "two"], images=[media["image"]])
    assert isinstance(inputs["input_ids"], list) and isinstance(inputs["input_ids"][0], list)
    assert isinstance(inputs["pixel_values"], torch.Tensor)  # media are fixed-size items, stacked
    assert isinstance(processor(text="<image>", images=media["image"], return_tensors="np")["input_ids"], np.ndarray)


def test_imu_options_by_section_equal_the_flat_keyword(processor):
    recording = imu_recording(rate=50)
    flat = processor(text="<imu>", imu=recording, imu_sampling_rate=50, return_tensors="pt")["imu_values"]
    nested = processor(text="<imu>", imu=recording, imu_kwargs={"sampling_rate": 50}, return_tensors="pt")["imu_values"]
    assert torch.equal(flat, nested)
    first_channel_last = processor(text="<imu>", imu=recording.T, imu_sampling_rate=50,
                                   imu_kwargs={"channels_first": False}, return_tensors="pt")["imu_values"]
    assert torch.equal(first_channel_last, flat)


def test_audio_takes_its_sampling_rate_flat_and_ignores_text_padding(processor, media):
    waveform = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    plain = processor(text="<audio>", audio=waveform, sampling_rate=16000, return_tensors="pt")["input_features"]
    nested = processor(text="<audio>", audio=waveform, audio_kwargs={"sampling_rate": 16000},
                       return_tensors="pt")["input_features"]
    padded_text = processor(text="<audio>", audio=waveform, sampling_rate=16000, padding=True,
                            return_tensors="pt")["input_features"]  # CLAP's own `padding` means "repeatpad" etc.
    assert torch.equal(plain, nested) and torch.equal(plain, padded_text)


def test_video_options_by_flat_keyword_and_section(processor, media):
    flat = processor(text="<video>", videos=media["video"], num_frames=2, return_tensors="pt")["pixel_values_videos"]
    nested = processor(text="<video>", videos=media["video"], videos_kwargs={"num_frames": 2},
                       return_tensors="pt")["pixel_values_videos"]
    assert flat.shape[1] == 2 and torch.equal(flat, nested)


def test_frames_per_second_truncates_as_transformers_sample_frames(processor):
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=30, fps=10)  # 3 s
    assert len(processor.video_processor.sample_frames(metadata, fps=1.9)) == 5  # 5.7 frames: 5, not 6
    assert len(processor.video_processor.sample_frames(metadata, fps=0.1)) == 1  # never none


def test_a_video_block_may_list_its_frames(processor, tmp_path):
    levels = [0, 60, 120, 180, 240]
    paths = []
    for index, level in enumerate(levels):
        Image.new("RGB", (40, 30), (level,) * 3).save(tmp_path / f"frame{index}.png")
        paths.append(str(tmp_path / f"frame{index}.png"))
    as_frames = processor.apply_chat_template(chat({"type": "video", "video": paths}), tokenize=True, return_dict=True,
                                              return_tensors="pt")["pixel_values_videos"]
    stacked = np.stack([np.asarray(Image.open(path)) for path in paths])
    as_array = processor.apply_chat_template(chat({"type": "video", "video": stacked}), tokenize=True, return_dict=True,
                                             return_tensors="pt")["pixel_values_videos"]
    assert as_frames.shape == (1, 4, 3, 32, 32) and torch.equal(as_frames, as_array)
    Image.new("RGB", (20, 30)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="different sizes"):
        processor.apply_chat_template(chat({"type": "video", "video": [paths[0], str(tmp_path / "small.png")]}),
                                      tokenize=True)


def image_only_processor(folder) -> AnyMALProcessor:
    """anymal-tiny's processor whose tokenizer holds only the <image> placeholder, as an image-only checkpoint's."""
    import json
    import shutil

    shutil.copytree(TINY, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [token for token in tokenizer["added_tokens"]
                                 if token["content"] not in ("<video>", "<audio>", "<imu>")]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["extra_special_tokens"] = ["<image>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return AutoProcessor.from_pretrained(folder)


def test_a_tokenizer_with_some_placeholders_serves_those_modalities(tmp_path, media, processor):
    image_only = image_only_processor(tmp_path / "image-only")
    assert image_only.modalities == ["image"] and image_only.audio_token_id is None
    inputs = image_only.apply_chat_template(chat({"type": "image", "path": media["image"]}), tokenize=True,
                                            return_dict=True, return_tensors="pt")
    full = processor.apply_chat_template(chat({"type": "image", "path": media["image"]}), tokenize=True,
                                         return_dict=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], full["input_ids"]) and torch.equal(inputs["pixel_values"], full["pixel_values"])
    plain = image_only(text="say <audio> aloud", return_tensors="pt")["input_ids"][0].tolist()
    assert processor.audio_token_id not in plain  # without its placeholder token, "<audio>" is plain text
    with pytest.raises(ValueError, match=r"has no <audio> placeholder: the checkpoint takes image, not audio"):
        image_only(text="hello", audio=np.zeros(16000, np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match=r"block 0: an item of audio, but this processor's tokenizer has no <audio>"):
        image_only.apply_chat_template(chat({"type": "audio", "path": media["audio"]}), tokenize=True)
