import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoProcessor

from transformers_anymal import AnyMALDataCollator

from anymal_tester import ANSWERS, TINY, make_chat_dataset


@pytest.fixture(scope="module")
def collator():
    return AnyMALDataCollator(AutoProcessor.from_pretrained(TINY), sampling_rates={"imu": 100})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from datasets import load_from_disk

    return load_from_disk(make_chat_dataset(tmp_path_factory.mktemp("chats")))["train"]


def test_labels_are_the_answers_only(collator, dataset):
    rows = [dataset[i] for i in range(4)]  # image, imu, both, text-only: different modality sets in one batch
    batch = collator(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "imu_values"}
    assert batch["pixel_values"].shape[0] == 2 and batch["imu_values"].shape[0] == 2
    tokenizer = collator.processor.tokenizer
    for row, labels in zip(rows, batch["labels"]):
        answer = row["messages"][-1]["content"][0]["text"]
        # exactly the answer, the token that carries the space before it included
        assert tokenizer.decode(labels[labels != -100]) == f" {answer} </s>"
    placeholders = [getattr(collator.processor, f"{name}_token_id") for name in ("image", "video", "audio", "imu")]
    assert (batch["labels"][torch.isin(batch["input_ids"], torch.tensor(placeholders))] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["attention_mask"][:, 0] == 1).all(), "training batches are padded on the right"


def test_sequence_length_is_the_rows_unpadded_length_in_a_batch(collator, dataset):
    rows = [dataset[i] for i in range(4)] + [
        {"prompt": [{"role": "user", "content": [{"type": "imu", "imu": np.zeros((6, 300)), "sampling_rate": 50},
                                                 {"type": "text", "text": "Doing what, over these three seconds?"}]}],
         "completion": [{"role": "assistant", "content": "walking"}]}]
    batch = collator(rows)
    lengths = [collator.sequence_length(row) for row in rows]
    assert lengths == batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(rows)  # each placeholder's run and each word counted, not a per-row constant
    # from the chat alone: a row whose media cannot be read still has its length
    assert collator.sequence_length({**rows[0], "images": ["/no/such/file.jpg"]}) == lengths[0]


def test_prompt_completion_rows_and_inline_items(collator):
    row = {"prompt": [{"role": "user", "content": [
               {"type": "imu", "imu": np.random.randn(6, 300), "sampling_rate": 50},
               {"type": "text", "text": "Doing?"}]}],
           "completion": [{"role": "assistant", "content": "walking"}]}
    batch = collator([row])
    assert batch["imu_values"].shape == (1, 6, 1000)
    labels = batch["labels"][0]
    assert collator.processor.tokenizer.decode(labels[labels != -100]) == " walking </s>"  # its first token is the bare space


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": []},
         r"row 0: a bare \{'type': 'image'\} block has no item left"),
        ({"messages": [{"role": "user", "content": "hi"}], "imus": [np.zeros((6, 300))]},
         r"row 0: column `imus` has 1 more imu item\(s\) than the chat has bare"),
        ({"text": "no chat"}, r"row 0: no `messages` \(or `prompt` \+ `completion`\) column"),
    ],
)
def test_rows_whose_media_and_blocks_disagree(collator, row, message):
    with pytest.raises(ValueError, match=message):
        collator([row])


@pytest.mark.parametrize("rows, message", [
    ([], r"empty batch"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], r"row 0, message 0: a message is a dict"),
    ([{"messages": [{"role": "user", "content": ["hello"]}, {"role": "assistant", "content": "x"}]}],
     r"row 0, message 0, block 0: a content block is a dict"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
      {"messages": [{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     r"conversation 1, message 0: role 'tool'.* \(in a batch of 2 rows: conversation N is row N\)"),
])
def test_malformed_rows_are_named(collator, rows, message):
    with pytest.raises((ValueError, TypeError), match=message):
        collator(rows)


def test_a_row_without_an_answer_is_refused_not_trained_on(collator):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of the batch have no assistant answer to learn from"):
        collator(rows)


def test_bare_blocks_with_keys_holding_none_take_the_columns_item(collator):
    recording = np.random.default_rng(0).standard_normal((6, 300))
    block = {"type": "imu", "imu": None, "url": None, "path": None}  # a datasets column of blocks gives every key
    row = {"messages": [{"role": "user", "content": [block, {"type": "text", "text": "Doing?"}]},
                        {"role": "assistant", "content": "walking"}], "imus": [recording], "imu_sampling_rate": 50}
    inline = {"messages": [{"role": "user", "content": [{"type": "imu", "imu": recording, "sampling_rate": 50},
                                                        {"type": "text", "text": "Doing?"}]},
                           {"role": "assistant", "content": "walking"}]}
    assert torch.equal(collator([row])["imu_values"], collator([inline])["imu_values"])


def test_missing_imu_rate_is_named():
    collator = AnyMALDataCollator(AutoProcessor.from_pretrained(TINY))
    row = {"messages": [{"role": "user", "content": [{"type": "imu"}]}], "imu": np.zeros((6, 300))}
    with pytest.raises(ValueError, match="row 0: no imu sampling rate; add a `imu_sampling_rate` column"):
        collator([row])


def test_check_dataset_names_the_bad_row_before_training(collator, dataset):
    rows = dataset.to_list()
    rows[5]["images"] = rows[5]["images"] + rows[5]["images"] if rows[5]["images"] else [rows[0]["images"][0]]
    with pytest.raises(ValueError, match="row 5: column `images` has 1 more image"):
        collator.check_dataset(Dataset.from_list(rows), ["image", "video", "audio", "imu"])
    with pytest.raises(ValueError, match="train row 1 uses imu but the model takes only"):
        collator.check_dataset(dataset, ["image"], name="train")
    assert set(ANSWERS) == {"image", "imu", "both", "text"}
