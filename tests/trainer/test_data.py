"""Dataset files: each bad input is a DatasetError naming file:line; SFT masks the prompt."""
from __future__ import annotations

import pytest

from tests.tiny import bundled_tokenizer
from tests.trainer.sft_fixtures import write_jsonl
from trainer.data import (IGNORE_INDEX, DatasetError, collate_sft, load_sft, micro_batches, read_records,
                          skipped_metrics, tokenize_sft)


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


@pytest.mark.parametrize("kind, lines, message", [
    ("sft", [], "empty dataset file"),
    ("sft", ["", "  "], "empty dataset file"),
    ("sft", ['{"prompt": "a", "response": "b"}', '{"prompt": "a", "resp'], r":2: malformed JSON"),
    ("sft", ['["prompt"]'], r":1: expected a JSON object"),
    ("sft", ['{"prompt": "a"}'], r":1: missing field 'response'"),
    ("sft", ['{"response": "b"}'], r":1: missing field 'prompt'"),
    ("sft", ['{"prompt": [{"role": "user"}], "response": "b"}'], r":1: prompt message 0"),
    ("sft", ['{"prompt": "", "response": "b"}'], r":1: 'prompt' is empty"),
    ("rm", ['{"prompt": "a", "completions": ["only one"], "source": "ranking"}'], r":1: .*at least 2 completions"),
    ("rm", ['{"prompt": "a", "source": "ranking"}'], r":1: missing field 'completions'"),
    ("ptx", ['{"text": 3}'], r":1: 'text' must be a non-empty string"),
    ("prompts", ['{"prompt": 3}'], r":1: 'prompt' must be"),
])
def test_bad_files_name_file_and_line(tmp_path, kind, lines, message):
    path = write_jsonl(tmp_path / f"{kind}.train.jsonl", lines)
    with pytest.raises(DatasetError, match=message) as e:
        list(read_records(path, kind))
    assert str(e.value).startswith(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        list(read_records(tmp_path / "nope.jsonl", "sft"))


def test_good_records_stream_with_line_numbers_and_unknown_keys_ignored(tmp_path):
    path = write_jsonl(tmp_path / "rm.jsonl", [
        {"prompt": "p", "completions": ["best", "mid", "worst"], "source": "ranking", "new_field": 1}, "",
        {"prompt": [{"role": "user", "content": "q"}], "completions": ["a", "b"], "source": "comparison"}])
    assert [n for n, _ in read_records(path, "rm")] == [1, 3]


def test_prompt_is_masked_and_response_is_the_assistant_turn(tokenizer):
    example = tokenize_sft({"prompt": "Say hello.", "response": "Hello there!"}, tokenizer, 256)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                               add_generation_prompt=True, tokenize=True)
    n = len(prompt_ids)
    assert example.input_ids[:n] == prompt_ids
    assert example.labels[:n] == [IGNORE_INDEX] * n
    assert example.labels[n:] == example.input_ids[n:]
    assert tokenizer.decode(example.labels[n:]).startswith("Hello there!<|im_end|>")


def test_message_prompts_are_used_as_given(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    example = tokenize_sft({"prompt": messages, "response": "Hey."}, tokenizer, 256)
    assert "Be brief." in tokenizer.decode(example.input_ids)
    assert "You are a helpful AI assistant" not in tokenizer.decode(example.input_ids)


def test_sequence_over_max_length_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"},
                                                 {"prompt": "a", "response": "word " * 200}])
    with pytest.raises(DatasetError, match=r"sft.jsonl:2: \d+ tokens .* exceed data.max_length 128"):
        load_sft(path, tokenizer, 128)


def test_too_long_skip_drops_and_counts_only_the_records_over_the_limit(tmp_path, tokenizer):
    long = "word " * 200
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": long},
                                                 {"prompt": long, "response": "c"}, {"prompt": "d", "response": "e"}])
    kept = load_sft(path, tokenizer, 128, too_long="skip")
    assert kept.skipped == 2 and len(kept) == 2
    assert [tokenizer.decode(e.input_ids).split("assistant\n")[-1].strip() for e in kept] == \
        ["b<|im_end|>", "e<|im_end|>"]  # the short ones, in file order, untouched
    assert skipped_metrics(train=kept, heldout=load_sft(path, tokenizer, 4096, too_long="skip")) == \
        {"skipped_too_long_train": 2}
    # other errors still stop the read under `skip`
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": long}, {"prompt": "a"}])
    with pytest.raises(DatasetError, match="bad.jsonl:2: missing field 'response'"):
        load_sft(bad, tokenizer, 128, too_long="skip")
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a", "response": long}])
    with pytest.raises(DatasetError, match=r"all 1 records exceed the length limit \(first: .*long.jsonl:1: "):
        load_sft(only_long, tokenizer, 128, too_long="skip")
    with pytest.raises(ValueError, match="too_long must be one of"):
        load_sft(path, tokenizer, 128, too_long="truncate")


def test_a_ranking_with_one_completion_over_the_limit_is_skipped_whole(tmp_path, tokenizer):
    from trainer.dpo import load_preferences
    from trainer.reward import load_rankings

    path = write_jsonl(tmp_path / "rm.jsonl", [{"prompt": "a", "completions": ["x", "y", "word " * 200]},
                                                {"prompt": "b", "completions": ["x", "y"]}])
    for load in (load_rankings, load_preferences):
        groups = load(path, tokenizer, 128, "skip")
        assert groups.skipped == 1 and len(groups) == 1  # never cut down to the completions that fit
        with pytest.raises(DatasetError, match="rm.jsonl:1"):
            load(path, tokenizer, 128)


def test_collate_pads_right_and_masks_padding(tokenizer):
    a = tokenize_sft({"prompt": "a", "response": "b"}, tokenizer, 256)
    b = tokenize_sft({"prompt": "a", "response": "a much longer answer"}, tokenizer, 256)
    batch = collate_sft([a, b], pad_id=tokenizer.pad_token_id)
    width = len(b.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    assert batch["attention_mask"][0].tolist() == [1] * len(a.input_ids) + [0] * (width - len(a.input_ids))
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert micro_batches(5, 2, seed=0, epoch=1, shuffle=True) == micro_batches(5, 2, seed=0, epoch=1, shuffle=True)
    assert micro_batches(5, 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert sorted(sum(micro_batches(5, 2, seed=0, epoch=3, shuffle=True), [])) == list(range(5))
