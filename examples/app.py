"""A multimodal chat with an AnyMAL checkpoint in the browser (Gradio), served on this machine only.

    python examples/app.py                       # the main job's final checkpoint (accelerate launch examples/sft.py)
    python examples/app.py --model path/to/anymal [--port 7860] [--max_new_tokens 64] [--safety]

Attach images, videos, audio (or record from the microphone) and IMU recordings (`.npy` or `.csv`, one column per
channel, with the sampling rate given in the page), ask about several at once, over several turns. Answers stream
token by token and name the media they used; an IMU recording is drawn as a plot of its channels. A file the
processor cannot read gets its message in the chat, and the chat goes on. With --safety, prompts and images are
checked before generation and answers while they stream (AnyMALSafetyChecker.offline(), the [safety] extra); a
refusal says which check tripped.
"""

import argparse
import os
from pathlib import Path
from threading import Thread


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no analytics calls

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import AutoModelForMultimodalLM, AutoProcessor, TextIteratorStreamer, pipeline  # noqa: E402

import transformers_anymal  # noqa: E402  (also registers AnyMAL with the Auto classes)
from transformers_anymal.feature_extraction_anymal import load_imu  # noqa: E402


DEFAULT_MODEL = "outputs/anymal-demo/instructed/merged"
SUFFIXES = {
    "image": {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"},
    "video": {".mp4", ".webm", ".mov", ".avi", ".mkv"},
    "audio": {".wav", ".flac", ".mp3", ".ogg", ".m4a"},
    "imu": {".npy", ".csv"},
}
PLOT_COLORS = ["#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b"]


def modality_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    for name, suffixes in SUFFIXES.items():
        if suffix in suffixes:
            return name
    known = ", ".join(sorted(set().union(*SUFFIXES.values())))
    raise ValueError(f"{Path(path).name}: {suffix or 'no suffix'} is not a file type this chat reads ({known}).")


def imu_plot(path: str, extractor, size=(360, 120)) -> Image.Image:
    """A picture of the recording's channels, each scaled to its own range, for the chat to show; the channels are
    found as the processor's IMU feature extractor finds them."""
    try:
        channels = extractor.time_major(load_imu(path)).T
    except ValueError as error:
        raise ValueError(f"{Path(path).name}: {error}") from error
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    for index, channel in enumerate(channels):
        low, high = float(channel.min()), float(channel.max())
        ys = (channel - low) / (high - low or 1.0)
        xs = np.linspace(0, width - 1, len(channel))
        draw.line([(x, (1 - y) * (height - 1)) for x, y in zip(xs, ys)], fill=PLOT_COLORS[index % 6], width=1)
    return image


def user_turn(text: str, files: list[str], imu_sampling_rate: float | None) -> tuple[dict, list[str]]:
    """The AnyMAL user message for a text and its attachments, and a line naming the media it holds."""
    content, names = [], []
    for path in files:
        name = modality_of(path)
        block = {"type": name, "path": path}
        if name == "imu":
            if not imu_sampling_rate:
                raise ValueError(f"{Path(path).name}: give the IMU sampling rate (Hz) in the field below the chat.")
            block["sampling_rate"] = int(imu_sampling_rate)
        content.append(block)
        names.append(f"{name} {Path(path).name}")
    if text.strip():
        content.append({"type": "text", "text": text.strip()})
    if not content:
        raise ValueError("Type a question or attach a file.")
    return {"role": "user", "content": content}, names


def shown_media(files: list[str], imu_extractor) -> list[dict]:
    """Chatbot messages that show the attachments; IMU recordings as plots (images that Gradio keeps in its own
    cache, as it does uploads)."""
    return [{"role": "user", "content": gr.Image(imu_plot(path, imu_extractor), format="png") if modality_of(path) == "imu"
             else {"path": path}} for path in files]


def build_app(model, processor, max_new_tokens: int = 64, safety_checker=None) -> gr.Blocks:
    pipe = pipeline("any-to-text", model=model, processor=processor, safety_checker=safety_checker)

    def respond(message: dict, shown: list, conversation: list, imu_sampling_rate):
        text, files = message.get("text") or "", [getattr(f, "path", f) for f in message.get("files") or []]
        try:
            turn, names = user_turn(text, files, imu_sampling_rate)
            question = [{"role": "user", "content": text}] if text.strip() else []
            shown = [*shown, *shown_media(files, processor.imu_feature_extractor), *question]
        except (ValueError, TypeError, OSError) as error:  # a file this chat cannot read, in the chat
            yield [*shown, {"role": "assistant", "content": f"⚠️ {error}"}], None, conversation
            return
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outcome = {}

        def generate():  # in a thread, so that the answer streams; the pipeline runs the safety checks
            try:
                [outcome["output"]] = pipe([*conversation, turn], max_new_tokens=max_new_tokens, do_sample=False,
                                           streamer=streamer, return_full_text=False)
            except Exception as error:  # the processor's message (or a failing check's): end the stream, say why
                outcome["error"] = error
                streamer.end()

        thread = Thread(target=generate)
        thread.start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield [*shown, {"role": "assistant", "content": answer.strip()}], None, conversation
        thread.join()
        if "error" in outcome:
            yield [*shown, {"role": "assistant", "content": f"⚠️ {outcome['error']}"}], None, conversation
            return
        output = outcome["output"]
        if (verdict := output.get("safety")) is not None:  # refused, or stopped: not kept in the conversation
            kept = output["generated_text"] if verdict["check"] == "output_text" else ""
            stopped = f"{kept}\n\n🛑 {safety_checker.refusal} ({verdict['reason']})".strip()
            yield [*shown, {"role": "assistant", "content": stopped}], None, conversation
            return
        conversation = [*conversation, turn, {"role": "assistant", "content": output["generated_text"]}]
        used = f"\n\n*used: {', '.join(names)}*" if names else ""
        yield [*shown, {"role": "assistant", "content": output["generated_text"] + used}], None, conversation

    with gr.Blocks(title="AnyMAL") as app:
        gr.Markdown("### AnyMAL: ask about images, videos, audio and IMU recordings")
        chatbot = gr.Chatbot(label="chat", height=480)
        box = gr.MultimodalTextbox(
            placeholder="Ask a question; attach images, videos, audio, IMU recordings (.npy, .csv)",
            file_count="multiple",  # any file: one this chat cannot read gets its reason in the chat
            sources=["upload", "microphone"], show_label=False,
        )
        imu_rate = gr.Number(label="IMU sampling rate (Hz) of attached recordings", value=None, precision=0)
        conversation = gr.State([])
        box.submit(respond, [box, chatbot, conversation, imu_rate], [chatbot, box, conversation], api_name="respond")
        gr.Button("New chat").click(lambda: ([], None, []), None, [chatbot, box, conversation], api_name="clear")
    return app


def load(model_path: str, device: str):
    model = AutoModelForMultimodalLM.from_pretrained(model_path).to(device).eval()
    return model, AutoProcessor.from_pretrained(model_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="AnyMAL checkpoint (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="longest answer (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: %(default)s)")
    parser.add_argument("--safety", action="store_true",
                        help="check prompts, images and answers with the offline classifiers of the [safety] extra "
                             "(AnyMALSafetyChecker.offline())")
    args = parser.parse_args(argv)
    if args.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).exists():
        raise SystemExit(f"No checkpoint at {DEFAULT_MODEL}: `accelerate launch examples/sft.py` (the main job) makes "
                         "it, or pass --model path/to/anymal.")
    model, processor = load(args.model, args.device)
    safety_checker = transformers_anymal.AnyMALSafetyChecker.offline() if args.safety else None
    app = build_app(model, processor, args.max_new_tokens, safety_checker)
    app.queue().launch(server_name="127.0.0.1", server_port=args.port)


if __name__ == "__main__":
    main()
