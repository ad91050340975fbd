"""Decoding the frames a video processor samples from a file, on one core: the processor's PyAV reader against
`transformers.video_utils.load_video(path, backend="pyav")`.

    python benchmarks/bench_video_decode.py [--quick]

`load_video` decodes every frame up to the last one sampled; `read_sampled_frames` starts at the keyframe before each
sampled frame and skips frames no other frame refers to. How much that saves depends on how often a clip has a
keyframe, so the clip, 10 s of 640x360 at 30 fps sampled at 8 frames, is encoded four ways: H.264 with libx264's
default keyframe interval (250 frames: one keyframe in this clip), with a keyframe every 2 s and every 1 s (common in
camera and streaming encodes), and MPEG-4 Part 2 with PyAV's default of one every 12 frames. Both readers must return
the same frames, bit for bit; clips per second are medians of interleaved rounds, on one core.
"""

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
from transformers.video_utils import load_video

from transformers_anymal import AnyMALVideoProcessor
from transformers_anymal.video_processing_anymal import read_sampled_frames

from common import interleaved_seconds, on_one_core, parse_args, print_table, write_clip


SECONDS, FPS, WIDTH, HEIGHT, SAMPLED = 10, 30, 640, 360, 8
ENCODINGS = {  # name: (codec, frames between keyframes, None for the encoder's default)
    "H.264, libx264 default (keyframe every 250 frames)": ("libx264", None),
    "H.264, keyframe every 2 s": ("libx264", 2 * FPS),
    "H.264, keyframe every 1 s": ("libx264", FPS),
    "MPEG-4 Part 2, PyAV default (keyframe every 12 frames)": ("mpeg4", None),
}


def main(argv=None) -> dict:
    args = parse_args(__doc__, "video_decode.json", argv)
    repeats = 3 if args.quick else 7
    processor = AnyMALVideoProcessor(num_frames=SAMPLED)

    def sample(metadata, **kwargs):
        return processor.sample_frames(metadata)

    readers = {"load_video (every frame up to the last sampled)": lambda path: load_video(path, sample_indices_fn=sample),
               "read_sampled_frames (keyframe seek, skips unreferenced frames)": lambda path: read_sampled_frames(path, sample)}
    results, rows = {}, []
    with on_one_core(), tempfile.TemporaryDirectory() as folder:  # FFmpeg's decoding threads on that core too
        for name, (codec, interval) in ENCODINGS.items():
            path = write_clip(Path(folder) / f"{codec}-{interval}.mp4", SECONDS * FPS, WIDTH, HEIGHT, FPS, codec,
                              interval)
            frames = [reader(path)[0] for reader in readers.values()]
            if not np.array_equal(*frames):
                raise AssertionError(f"{name}: read_sampled_frames returned other frames than load_video")
            seconds = interleaved_seconds({reader: functools.partial(read, path) for reader, read in readers.items()},
                                          "cpu", repeats)
            before, after = (1 / float(np.median(times)) for times in seconds.values())
            results[name] = {"load_video_clips_per_second": before, "read_sampled_frames_clips_per_second": after,
                             "speedup": after / before}
            rows.append([name, f"{before:.1f}", f"{after:.1f}", f"{after / before:.2f}x"])
    print_table(f"{SECONDS} s {WIDTH}x{HEIGHT} {FPS} fps clip -> {SAMPLED} frames, clips per second on one core "
                f"(median of {repeats}; same frames from both)",
                ["encoding", "load_video", "read_sampled_frames", "speed-up"], rows)
    output = {"results": results, "repeats": repeats,
              "video_decode_speedup": results["H.264, keyframe every 2 s"]["speedup"]}
    Path(args.output).write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
