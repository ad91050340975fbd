"""Video processor for AnyMAL: uniform frame sampling over the clip's duration, then CLIP's image preprocessing."""

import io
import os
from bisect import bisect_right
from urllib.parse import urlparse

import numpy as np
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils.import_utils import is_torchcodec_usable
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata, load_video


class AnyMALVideoProcessor(BaseVideoProcessor):
    r"""
    Samples `num_frames` frames uniformly in time (at the clip's real frame rate, read from the file) and preprocesses
    them like CLIP images. Clips shorter than `num_frames` frames repeat frames rather than fail. Files decode with
    torchcodec when it is installed, otherwise with PyAV, seeking to the keyframe before each sampled frame
    (`read_sampled_frames`) instead of decoding every frame up to the last one sampled.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    num_frames = 8
    model_input_names = ["pixel_values_videos"]

    def sample_frames(self, metadata: VideoMetadata, num_frames: int | None = None, fps=None, **kwargs) -> np.ndarray:
        num_frames = num_frames or self.num_frames
        total = metadata.total_num_frames
        if not total:
            raise ValueError("the video has no frames")
        if fps is not None and metadata.fps:  # frames per second of video instead of a fixed count
            num_frames = max(1, int(total / metadata.fps * fps))  # truncated, as transformers samples
        # the middle of each of num_frames equal stretches of the clip
        return ((np.arange(num_frames) + 0.5) * total / num_frames).astype(int)

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        if isinstance(video_url_or_urls, list):
            return list(zip(*[self.fetch_videos(video, sample_indices_fn) for video in video_url_or_urls]))
        if isinstance(video_url_or_urls, io.IOBase):  # a file's bytes, e.g. a WebDataset sample's
            return read_sampled_frames(video_url_or_urls, sample_indices_fn)
        if is_torchcodec_usable(decode="video"):
            return load_video(video_url_or_urls, backend="torchcodec", sample_indices_fn=sample_indices_fn)
        if isinstance(video_url_or_urls, (str, os.PathLike)) and os.path.isfile(video_url_or_urls):
            return read_sampled_frames(os.fspath(video_url_or_urls), sample_indices_fn)
        url = urlparse(video_url_or_urls) if isinstance(video_url_or_urls, str) else None
        if url and url.scheme in ("http", "https") and not url.netloc.endswith("youtube.com"):
            import httpx

            response = httpx.get(video_url_or_urls, follow_redirects=True)
            response.raise_for_status()
            return read_sampled_frames(io.BytesIO(response.content), sample_indices_fn)
        return load_video(video_url_or_urls, backend="pyav", sample_indices_fn=sample_indices_fn)  # YouTube, arrays


def read_sampled_frames(path: str | io.BytesIO, sample_indices_fn) -> tuple[np.ndarray, VideoMetadata]:
    """The frames of the video at `path` (a file, or a file object) that `sample_indices_fn(metadata=...)` picks,
    decoded with PyAV, and the clip's metadata, as `transformers.video_utils.load_video(path, backend="pyav")`
    returns them: frame `i` is the `i`-th frame in presentation order, and the frames are the same, bit for bit.

    `load_video` decodes every frame up to the last one sampled. Here a pass over the packets (no decoding) finds each
    frame's timestamp and the keyframes; decoding then starts at the keyframe before each sampled frame (or goes on
    from the previous one when no keyframe lies in between), and frames that no other frame refers to are skipped
    unless sampled (FFmpeg's `skip_frame="NONREF"`). An index repeated (a clip shorter than the frames asked for)
    repeats its frame, as array clips do."""
    import av

    name = path if isinstance(path, str) else "the video"
    with av.open(path) as container:
        stream = container.streams.video[0]
        stamps = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.pts is not None]
        timestamps = sorted(pts for pts, _ in stamps)
        keyframes = sorted(pts for pts, keyframe in stamps if keyframe)
        if not timestamps or not keyframes:
            raise ValueError(f"{name}: the stream has no timestamped frames to decode.")
        fps = stream.average_rate
        total = stream.frames or len(timestamps)  # containers such as Matroska do not store the count
        metadata = VideoMetadata(total_num_frames=int(total), fps=float(fps), duration=float(total / fps) if fps else 0.0,
                                 video_backend="pyav", height=stream.height, width=stream.width)
        indices = [int(index) for index in sample_indices_fn(metadata=metadata)]
        sampled = [timestamps[min(index, len(timestamps) - 1)] for index in indices]  # the count may overstate
        wanted = set(sampled)
        frames = {}
        position = None  # timestamp of the last frame decoded, None before the first and after the stream ends
        for target in sorted(wanted):
            if target in frames:
                continue
            keyframe = keyframes[max(bisect_right(keyframes, target) - 1, 0)]
            if position is None or target <= position or keyframe > position:
                container.seek(keyframe, stream=stream, backward=True)
                position = None
                packets = container.demux(stream)
            for packet in packets:
                # decode every frame others refer to, and the sampled ones; skip the rest
                stream.codec_context.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                for frame in packet.decode():
                    if frame.pts is None:
                        continue
                    position = frame.pts
                    if position in wanted:
                        frames[position] = frame.to_ndarray(format="rgb24")
                if target in frames:
                    break
            else:  # the stream ended: the next frame needs a new seek
                position = None
            if target not in frames:
                raise ValueError(f"{name}: the frame at timestamp {target} could not be decoded.")
    metadata.frames_indices = np.asarray(indices)
    return np.stack([frames[timestamp] for timestamp in sampled]), metadata


__all__ = ["AnyMALVideoProcessor"]
