import hashlib

from feedback.prompt_key import prompt_key


def test_a_plain_prompt_is_the_sha256_of_its_json_string():
    assert prompt_key("hi") == hashlib.sha256(b'"hi"').hexdigest()
    assert prompt_key("café") == hashlib.sha256('"café"'.encode()).hexdigest()  # UTF-8, not \u-escaped


def test_a_chat_is_keyed_by_roles_and_contents_only():
    chat = [{"role": "user", "content": "hi"}]
    assert prompt_key(chat) == hashlib.sha256(b'[{"content":"hi","role":"user"}]').hexdigest()
    assert prompt_key([{"content": "hi", "role": "user", "name": "ann"}]) == prompt_key(chat)
    assert prompt_key(chat) != prompt_key("hi")
    assert prompt_key(chat + [{"role": "assistant", "content": "hello"}]) != prompt_key(chat)
