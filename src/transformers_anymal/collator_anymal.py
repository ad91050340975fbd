"""AnyMALDataCollator: chat rows with media of any modality in, padded model inputs with answer-only labels out."""

from dataclasses import dataclass, field

import numpy as np
import torch

from .configuration_anymal import MODALITIES
from .processing_anymal import AnyMALProcessor, EncoderFeatures, media_kind


def media_columns(name: str) -> tuple[str, str]:
    """Dataset columns that hold the items of bare blocks such as {"type": "image"}: a list per row (TRL's `images`)
    under the plural name, one item per row under the singular."""
    return f"{name}s", name


@dataclass
class AnyMALDataCollator:
    """
    Turns dataset rows into training batches for [`AnyMALForConditionalGeneration`], for any `Trainer`/`SFTTrainer`.

    A row holds a chat, as `messages` or as `prompt` + `completion` (TRL's conversational format). Media blocks carry
    their item (`{"type": "image", "image": ...}`) or are bare (`{"type": "image"}`) and take the row's next item
    from its media columns: `images`, `videos`, `audios`, `imus` (`<modality>s`) hold a list per row, `image`, `video`,
    `audio`, `imu` one item per row. Audio may be arrays with a `sampling_rate`, datasets `Audio` values or paths;
    recordings whose files do not say their rate (IMU) take it from the block, the row's `<modality>_sampling_rate`
    column or `sampling_rates` here. Rows in a batch may carry different modalities.

    Rows written by `examples/cache_features.py` hold each item's frozen-encoder features in `<modality>_features`
    columns instead of media (flat, with the item's shape in `<modality>_feature_shape`, or as nested arrays); their
    batches carry `encoder_features` and the encoders do not run.

    `labels` are the input ids on the assistant's answers (with their end-of-turn token) and -100 everywhere else:
    system and user text, placeholders and padding.

    Args:
        processor ([`AnyMALProcessor`]): the model's processor.
        sampling_rates (`dict[str, int]`, *optional*): rate by modality of the recordings whose rows don't say, e.g.
            `{"imu": 100}`.
        padding_side (`str`, *optional*, defaults to `"right"`): training pads on the right.
    """

    processor: AnyMALProcessor
    sampling_rates: dict[str, int] = field(default_factory=dict)
    padding_side: str = "right"

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("AnyMALDataCollator got an empty batch; give it at least one row.")
        chats = [self.chat(row, index) for index, row in enumerate(rows)]
        try:
            batch = self.processor.apply_chat_template(
                chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
                processor_kwargs={"padding_side": self.padding_side},
            )
        except (ValueError, TypeError) as error:  # the processor numbers the batch's rows as its conversations
            raise type(error)(f"{error} (in a batch of {len(rows)} rows: conversation N is row N)") from error
        answers = batch.pop("assistant_masks").bool() & batch["attention_mask"].bool()
        for name in self.processor.modalities:  # a media block inside an answer is input, not something to predict
            answers &= batch["input_ids"] != getattr(self.processor, f"{name}_token_id")
        batch["labels"] = batch["input_ids"].masked_fill(~answers, -100)
        if not (nothing_to_learn := ~answers.any(1)).any():
            return dict(batch)
        raise ValueError(
            f"row(s) {nothing_to_learn.nonzero().flatten().tolist()} of the batch have no assistant answer to learn "
            "from; end each training chat with an assistant turn (or a `completion`)."
        )

    def chat(self, row: dict, index: int = 0, decode: bool = True) -> list[dict]:
        """The row's chat with every media block holding its item; checks blocks against the media columns."""
        return chat_of_row(row, self.processor.modalities, self.sampling_rates, index, decode)

    def sequence_length(self, row: dict, index: int = 0) -> int:
        """The tokens the row takes in a batch before padding, each placeholder's run counted in full, from its chat
        alone: no media is read or decoded. What `--train_sampling_strategy group_by_length` groups rows by."""
        text = self.processor.apply_chat_template(row_messages(row, index), tokenize=False)
        tokenizer = self.processor.tokenizer
        # as the processor tokenizes a rendered chat: the tokenizer's own special tokens unless the text has its BOS
        bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
        runs = {getattr(self.processor, f"{name}_token_id"): self.processor.num_tokens[name]
                for name in self.processor.modalities}
        return sum(runs.get(token, 1) for token in tokenizer(text, add_special_tokens=not bos)["input_ids"])

    def check_dataset(self, dataset, modalities: list[str], name: str = "dataset"):
        """Fails before training, naming the row and column, where a row's media blocks and media columns disagree,
        a row lacks a sampling rate, or a row uses a modality the model lacks. Media are not decoded."""
        for index, row in enumerate(dataset):
            chat = self.chat(row, index, decode=False)
            used = {block["type"] for message in chat if isinstance(message["content"], list)
                    for block in message["content"] if block.get("type") in MODALITIES}
            if missing := sorted(used - set(modalities)):
                raise ValueError(
                    f"{name} row {index} uses {', '.join(missing)} but the model takes only {modalities}; drop those "
                    f"rows or use a model with {' and '.join(f'{m}_config' for m in missing)}."
                )


def chat_of_row(row: dict, modalities: list[str], sampling_rates: dict[str, int] | None = None, index: int = 0,
                decode: bool = True) -> list[dict]:
    """Row `index`'s chat with every media block of `modalities` holding its item (decoded when `decode`), taken
    inline or from the row's media columns (`media_columns`); blocks of recordings whose files do not say their rate
    get it from the block, the row's `<modality>_sampling_rate` or `sampling_rates`. Checks blocks against the media
    columns."""
    messages = row_messages(row, index)
    served = modalities  # a column named like another registered modality is no media here
    columns = {name: next((column for column in media_columns(name) if row.get(column) is not None), None)
               for name in served}
    remaining = {name: ([row[column]] if column == name else list(row[column])) if column else []
                 for name, column in columns.items()}
    cached = {name: _cached_items(row, name) for name in served if row.get(f"{name}_features") is not None}
    chat = []
    for message_index, message in enumerate(messages):
        if not isinstance(message, dict) or "content" not in message:
            raise ValueError(f"row {index}, message {message_index}: a message is a dict with 'role' and "
                             f"'content', got {message!r:.60}.")
        content = message["content"]
        if isinstance(content, list):
            for block_index, block in enumerate(content):
                if not isinstance(block, dict):
                    raise TypeError(f"row {index}, message {message_index}, block {block_index}: a content block "
                                    f"is a dict such as {{'type': 'text', 'text': ...}}, got {block!r:.40}.")
            content = [_cached(block, cached, index) if block.get("type") in cached
                       else _fill(block, remaining, columns, row, index, decode, sampling_rates or {})
                       for block in content]
        chat.append({**message, "content": content})
    for name, features in cached.items():
        if features:
            raise ValueError(f"row {index}: `{name}_features` has {len(features)} more entries than {name} blocks.")
    for name, items in remaining.items():
        if items:
            raise ValueError(
                f"row {index}: column `{columns[name]}` has {len(items)} more {name} item(s) than the chat has "
                f"bare {{'type': '{name}'}} blocks; add a block where each item belongs."
            )
    return chat


def row_messages(row: dict, index: int = 0) -> list:
    """The row's messages as they stand: its `messages`, or its `prompt` followed by its `completion`."""
    if "messages" in row:
        return row["messages"]
    if "prompt" in row and "completion" in row:
        return list(row["prompt"]) + list(row["completion"])
    raise ValueError(f"row {index}: no `messages` (or `prompt` + `completion`) column; got {sorted(row)}.")


def bare_chat(chat: list[dict]) -> list[dict]:
    """A chat as files and caches store it, beside its media: every content a list of blocks (a string becomes one
    text block, which chat templates render alike), media blocks bare (`{"type": "image", "text": None}`)."""
    return [{"role": message["role"],
             "content": [{"type": "text", "text": message["content"]}] if isinstance(message["content"], str) else
                        [{"type": block["type"], "text": block.get("text") if block["type"] == "text" else None}
                         for block in message["content"]]}
            for message in chat]


def _cached(block: dict, cached: dict, index: int) -> dict:
    """A media block whose item's encoder features sit in the row's `<modality>_features` column."""
    name = block["type"]
    if not cached[name]:
        raise ValueError(f"row {index}: more {name} blocks than entries in its `{name}_features` column.")
    return {"type": name, name: EncoderFeatures(cached[name].pop(0))}


def _fill(block: dict, remaining: dict, columns: dict, row: dict, index: int, decode: bool,
          sampling_rates: dict[str, int]) -> dict:
    name = block.get("type")
    if name not in remaining:  # not a modality the processor serves: it refuses the block by name
        return block
    kind = media_kind(name)
    keys = (name, *kind.block_sources)
    if any(block.get(key) is not None for key in keys):  # keys holding None, as datasets gives them
        item = block.get(name)
    elif remaining[name]:
        item = remaining[name].pop(0)
    else:
        column = columns[name] or f"`{'`/`'.join(media_columns(name))}`"
        raise ValueError(
            f"row {index}: a bare {{'type': '{name}'}} block has no item left in column {column}; give each "
            f"{name} block an item there (or inline, as {{'type': '{name}', '{name}': ...}})."
        )
    block = dict(block)
    if item is None:
        return block
    for key in kind.block_sources:
        block.pop(key, None)
    block[name] = kind.decoded(item) if decode else item
    if isinstance(block[name], dict) and "array" in block[name] and "sampling_rate" in block[name]:
        block.update({name: block[name]["array"], "sampling_rate": block[name]["sampling_rate"]})
    says_rate = isinstance(block[name], dict) or kind.files_carry_rate and not hasattr(block[name], "ndim")
    if kind.timed and not says_rate and "sampling_rate" not in block:
        rate = row.get(f"{name}_sampling_rate", sampling_rates.get(name))
        if rate is None:
            raise ValueError(
                f"row {index}: no {name} sampling rate; add a `{name}_sampling_rate` column, put `sampling_rate` "
                f"in the block, or pass AnyMALDataCollator(sampling_rates={{{name!r}: ...}})."
            )
        block["sampling_rate"] = rate
    return block


def _cached_items(row: dict, name: str) -> list:
    """A row's cached features of `name`, one array per item: flat items take the row's `<name>_feature_shape`."""
    items, shape = row[f"{name}_features"], row.get(f"{name}_feature_shape")
    if shape is None or len(shape) == 0:
        return list(items)
    return [np.asarray(item).reshape(tuple(int(size) for size in shape)) for item in items]


__all__ = ["AnyMALDataCollator", "bare_chat", "chat_of_row"]
