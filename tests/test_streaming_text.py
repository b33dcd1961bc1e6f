"""Streaming non-ASCII text through the deployed endpoint with the real openai client.

A model whose output is scripted by its weights: attention and MLP outputs are zero (the
residual passes each token through unchanged), every token of a chain has its own embedding
direction, and the output head maps each one to the next. Greedy decoding then writes text with
byte-fallback pieces (an accented letter, an emoji, CJK) whatever the batch, so the streamed
deltas can be checked against the whole text: no broken character, joined = final."""

import openai
import pytest
import torch

from clirun import herd, herd_json
from conftest import serve_port
from cluster.models import import_model
from cluster.storage import open_storage
from llama.tiny import create_tiny
from llama.tokenizer import Tokenizer, encode_dialog
from llama.weights import load_model, save_model

TEXT = "Perché😀東京 fine"
pytestmark = pytest.mark.usefixtures("ray_cluster")


def scripted_model(directory, chain: list[int], starts: list[int], eos: int) -> None:
    """Rewrite a tiny model so that after token chain[i] it picks chain[i + 1] (then EOS), and after
    any of `starts` it picks chain[0]."""
    model = load_model(directory)
    cfg = model.cfg
    assert len(set(chain)) == len(chain) and len(chain) + len(starts) <= cfg.dim
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in model.layers:
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        for i, token in enumerate(starts + chain):
            model.tok_embeddings.weight[token, i] = 1.0
            following = chain[0] if i < len(starts) else (chain + [eos])[i - len(starts) + 1]
            model.output.weight[following, i] = 10.0
    save_model(model, directory)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    src = create_tiny(root / "src")
    tok = Tokenizer(src / "tokenizer.model")
    chain = tok.encode(TEXT, bos=False)
    starts = [tok.encode("hi", bos=True)[-1], encode_dialog(tok, [{"role": "user", "content": "hi"}])[-1]]
    assert not set(starts) & set(chain)
    scripted_model(src, chain, starts=starts, eos=tok.eos_id)
    url = str(root / "storage")
    import_model(open_storage(url), src, "scripted")
    port = serve_port()
    herd_json("serve", "deploy", "--model", "scripted", "--port", str(port), "--max-loras", "0", storage=url)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    herd("serve", "shutdown")


def test_streamed_text_equals_the_final_text_for_accents_emoji_and_cjk(endpoint):
    whole = endpoint.completions.create(model="scripted", prompt="hi", max_tokens=40, temperature=0)
    assert whole.choices[0].text == TEXT and whole.choices[0].finish_reason == "stop"
    deltas = [c.choices[0].text for c in endpoint.completions.create(
        model="scripted", prompt="hi", max_tokens=40, temperature=0, stream=True) if c.choices]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas) and len([d for d in deltas if d]) > 3

    chat = endpoint.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=40, temperature=0)
    assert chat.choices[0].message.content == TEXT
    streamed = [c.choices[0].delta.content or "" for c in endpoint.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "hi"}], max_tokens=40, temperature=0,
        stream=True) if c.choices]
    assert "".join(streamed) == TEXT and all("\ufffd" not in d for d in streamed)
