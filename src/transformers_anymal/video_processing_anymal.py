"""Video processor for AnyMAL: uniform frame sampling over the clip's duration, then CLIP's image preprocessing."""

import numpy as np
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils.import_utils import is_torchcodec_usable
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata, load_video


class AnyMALVideoProcessor(BaseVideoProcessor):
    r"""
    Samples `num_frames` frames uniformly in time (at the clip's real frame rate, read from the file) and preprocesses
    them like CLIP images. Clips shorter than `num_frames` frames repeat frames rather than fail. Files decode with
    torchcodec when it is installed, otherwise with PyAV.
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
        backend = "torchcodec" if is_torchcodec_usable(decode="video") else "pyav"
        return load_video(video_url_or_urls, backend=backend, sample_indices_fn=sample_indices_fn)


__all__ = ["AnyMALVideoProcessor"]
