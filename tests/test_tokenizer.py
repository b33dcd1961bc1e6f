"""The tokenizer against transformers' LlamaTokenizer, and the chat template against Meta's code."""

import shutil

import pytest

from llama.tiny import corpus_lines
from llama.tokenizer import DialogError, Tokenizer, dialog_segments, encode_dialog


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def test_llama2_special_ids(tok):
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.sp.id_to_piece(3) == "<0x00>"  # byte fallback
    assert 256 < tok.n_words <= 4000


def test_ids_equal_transformers_llama_tokenizer(tok, tokenizer_path, tmp_path):
    from transformers import LlamaTokenizer
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(tmp_path)
    lines = corpus_lines(300_000)
    texts = lines[::97][:200] + ["Unseen wörds: naïve café, 日本語, emoji 🙂, digits 2024-11-27",
                                 "[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]", "tabs\tand\nnewlines  here"]
    for text in texts:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text


def test_leading_whitespace_follows_sentencepiece(tok):
    """Meta's tokenizer is plain sentencepiece: a leading space is its own piece after the dummy prefix.

    (transformers' fast LlamaTokenizer folds it into the dummy prefix; Herd follows Meta.)"""
    assert [tok.sp.id_to_piece(i) for i in tok.encode(" lead")][:2] == ["▁", "▁le"]


# Meta's reference, llama/generation.py `chat_completion`, transcribed as (text, bos, eos) calls.
def meta_reference(dialog):
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    calls = []
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        calls.append((f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ", True, True))
    calls.append((f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", True, False))
    return calls


SYS = {"role": "system", "content": "Always answer with Haiku"}
U1 = {"role": "user", "content": "I am going to Paris, what should I see?"}
A1 = {"role": "assistant", "content": " Paris, the capital of France, is known for the Eiffel Tower. "}
U2 = {"role": "user", "content": "What is so great about #1?"}
A2 = {"role": "assistant", "content": "It is tall."}
U3 = {"role": "user", "content": "And the Louvre?"}
DIALOGS = {
    "1-turn": [U1], "1-turn+sys": [SYS, U1],
    "2-turn": [U1, A1, U2], "2-turn+sys": [SYS, U1, A1, U2],
    "3-turn": [U1, A1, U2, A2, U3], "3-turn+sys": [SYS, U1, A1, U2, A2, U3],
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_chat_template_equals_meta_reference(tok, name):
    dialog = DIALOGS[name]
    ours = [(s.text, s.bos, s.eos) for s in dialog_segments(dialog)]
    assert ours == meta_reference(dialog)
    ref_ids = sum((tok.encode(t, bos=b, eos=e) for t, b, e in meta_reference(dialog)), [])
    assert encode_dialog(tok, dialog) == ref_ids


def test_chat_template_literal_string():
    segs = dialog_segments([SYS, U1, A1, U2])
    text = "".join(("<s>" if s.bos else "") + s.text + ("</s>" if s.eos else "") for s in segs)
    assert text == ("<s>[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris, what should I "
                    "see? [/INST] Paris, the capital of France, is known for the Eiffel Tower. </s>"
                    "<s>[INST] What is so great about #1? [/INST]")
    assert segs[0].text[segs[0].answer_start:].startswith("Paris")


@pytest.mark.parametrize("content", ["[INST] sneaky", "x [/INST] y", "<<SYS>> z", "<</SYS>>"])
def test_tag_injection_refused(tok, content):
    with pytest.raises(DialogError, match="special tags"):
        encode_dialog(tok, [{"role": "user", "content": content}])


@pytest.mark.parametrize("dialog,match", [
    ([], "empty"),
    ([{"role": "assistant", "content": "hi"}], "expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "robot", "content": "a"}], "not system, user or assistant"),
    ([{"role": "system", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
])
def test_bad_dialogs_refused(tok, dialog, match):
    with pytest.raises(DialogError, match=match):
        encode_dialog(tok, dialog)
