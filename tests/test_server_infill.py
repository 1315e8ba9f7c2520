"""`suffix` (fill-in-the-middle) in /api/generate and /v1/completions: the exact prompt ids fed to the engine
for a tiny model whose GGUF declares FIM tokens, and the "does not support insert" error for SmolLM2 (none)."""
from __future__ import annotations

import gguf
import httpx
import ollama
import openai
import pytest

import tiny_models
from ember.server.app import ServerConfig, start_in_thread
from ember.server.models import ModelSpec

# The tiny SPM vocabulary (tiny_models.spm_vocab): <unk> <s> </s>, 256 byte tokens, then WORDS from id 259,
# then unused padding from 275 to 287; three of the padding ids serve as FIM tokens.
BOS, FIM_PRE, FIM_SUF, FIM_MID = 1, 280, 281, 282


class _FIMWriter(gguf.GGUFWriter):
    """write_tiny_model's writer, declaring FIM token ids as llama.cpp's converter writes them."""

    def write_header_to_file(self, *args, **kwargs):
        self.add_uint32("tokenizer.ggml.fim_pre_token_id", FIM_PRE)
        self.add_uint32("tokenizer.ggml.fim_suf_token_id", FIM_SUF)
        self.add_uint32("tokenizer.ggml.fim_mid_token_id", FIM_MID)
        super().write_header_to_file(*args, **kwargs)


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("fim") / "tiny-fim.gguf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny_models.gguf, "GGUFWriter", _FIMWriter)
        tiny_models.write_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def server(fim_model):
    srv = start_in_thread(ServerConfig(threads=1, access_log=False,
                                       models={"tinyfim": ModelSpec(str(fim_model))}))
    yield srv
    srv.stop()


@pytest.fixture
def fed(server):
    """The prompt ids each engine request of the tiny model received, in order, and a function giving the
    ids expected for a prefix and a suffix."""
    ollama.Client(host=server.url).generate(model="tinyfim", prompt="the", options={"num_predict": 1})  # load it
    lm = next(lm for lm in server.app.state.manager.loaded.values() if str(lm.model.path).endswith("tiny-fim.gguf"))
    engine = lm.model.engine
    original = engine.add_request
    seen: list[list[int]] = []

    def record(ids, *args, **kwargs):
        seen.append(list(ids))
        return original(ids, *args, **kwargs)

    tok = lm.model.tokenizer

    def expected(prefix: str, suffix: str) -> list[int]:
        # Text tokenized as text (space prefix as SentencePiece adds it, no BOS); ids that are FIM markers
        # in this vocabulary never come out of plain text.
        head, tail = tok.encode(prefix, add_special=False), tok.encode(suffix, add_special=False)
        assert tok.decode(head) == " " + prefix and tok.decode(tail) == " " + suffix
        assert not {BOS, FIM_PRE, FIM_SUF, FIM_MID} & set(head + tail)
        return [BOS, FIM_PRE, *head, FIM_SUF, *tail, FIM_MID]

    engine.add_request = record
    yield seen, expected
    engine.add_request = original


def test_ollama_generate_suffix_builds_the_fim_prompt(server, fed):
    fed, _expected = fed
    client = ollama.Client(host=server.url)
    r = client.generate(model="tinyfim", prompt="the cat", suffix="sat on", options={"num_predict": 3,
                                                                                     "temperature": 0})
    assert fed == [_expected("the cat", "sat on")]
    assert r.done and r.eval_count <= 3 and r.prompt_eval_count == len(fed[0])
    # No template, no system prompt: a `system` field changes nothing in a FIM prompt.
    client.generate(model="tinyfim", prompt="a dog", suffix="ran", system="be brief",
                    options={"num_predict": 1})
    assert fed[-1] == _expected("a dog", "ran")


def test_openai_completions_suffix_builds_the_fim_prompt(server, fed):
    fed, _expected = fed
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tinyfim", prompt=["the cat", "a dog"], suffix="on the mat", max_tokens=2,
                                  temperature=0)
    assert fed == [_expected("the cat", "on the mat"), _expected("a dog", "on the mat")]
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == len(fed[0]) + len(fed[1])


@pytest.mark.model
def test_models_without_fim_tokens_refuse_insert(smollm2_path, server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/api/generate", json={"model": "smollm2", "prompt": "def f(", "suffix": "return x",
                                             "stream": False})
        assert r.status_code == 400 and r.json() == {"error": "model 'smollm2' does not support insert"}
        r = http.post("/v1/completions", json={"model": "smollm2", "prompt": "def f(", "suffix": "return x"})
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "model 'smollm2' does not support insert",
                                     "type": "invalid_request_error", "param": "suffix", "code": None}
        r = http.post("/api/generate", json={"model": "tinyfim", "prompt": "the", "suffix": 5})
        assert r.status_code == 400 and "suffix" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).generate(model="smollm2", prompt="def f(", suffix="return x")
    assert e.value.status_code == 400 and "does not support insert" in e.value.error
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e2:
        client.completions.create(model="smollm2", prompt="def f(", suffix="return x")
    assert e2.value.param == "suffix"
