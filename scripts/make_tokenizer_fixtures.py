"""Write tests/fixtures/tokenizer_<name>.json: llama.cpp's own tokenization of a few hundred varied strings.

DEV TOOL ONLY: needs llama-cpp-python 0.3.36 (its vendored llama.cpp is the reference Ember matches), which is
never a dependency of Ember:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36
    python scripts/make_tokenizer_fixtures.py [--smollm2 PATH] [--gemma3 PATH]

Fixtures written:

| file                              | vocabulary                              | tokenizer.ggml.pre |
|-----------------------------------|-----------------------------------------|--------------------|
| tokenizer_smollm2.json            | SmolLM2-135M-Instruct (gpt2 BPE)         | smollm             |
| tokenizer_gemma3.json             | gemma-3-270m (llama SPM)                 | default            |
| tokenizer_bpe_<pre>.json          | SmolLM2's tokens and merges, re-labelled | llama-bpe, qwen2, default, gpt-2 |
| tokenizer_spm_lstrip-mask.json    | gemma3, <mask> LSTRIP by pre name        | jina-v2-de         |
| tokenizer_spm_defaults.json       | gemma3 without add_* flags (defaults)    | default            |

The variant vocabularies (table VARIANTS) are vocab-only GGUFs (no tensors) written here with gguf-py from a base
model's metadata with a few keys set or dropped; each fixture records its edits, and the tests rebuild the same
metadata from the base model. The GGUFs themselves are not committed.

Each fixture holds, per string, the ids for the (add_special, parse_special) combinations listed in "modes", plus
per-vocabulary facts: special ids, add_bos/add_eos, the EOG set, token attributes, and a SHA-256 over every
token's piece (token_to_piece with special on and off) so that detokenization is checked for every token.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def corpus() -> list[str]:
    """A deterministic, varied set of test strings."""
    s: list[str] = [
        "", " ", "  ", "a", "Hello world", "Hello, world!", "hello world\n", " Hello  world\n\n",
        "The quick brown fox jumps over the lazy dog.",
        "THE QUICK BROWN FOX", "tHe qUiCk", "CamelCaseIdentifierName", "snake_case_name __dunder__",
        # contractions, in both cases and in odd places
        "I'm sure you're right, they've said he'll go and she'd agree; it's John's.",
        "I'M SURE YOU'RE RIGHT, THEY'VE SAID HE'LL GO AND SHE'D AGREE; IT'S JOHN'S.",
        "don't won't can't shouldn't y'all o'clock 'tis", "'s 't 're 've 'm 'll 'd", "''' \"\"\" ` ``` '",
        "rock 'n' roll", "the '90s", "'hello'", "it’s curly’s", "l'homme d'état",
        # numbers of many lengths and shapes
        *[str(10 ** k + 7 * k) for k in range(0, 22)],
        *[" " + "9" * k for k in range(1, 9)],
        "3.14159 2.71828 -42 +17 1e-9 0x1F 0b1010 0o777", "1,234,567.89 1.234.567,89", "$100 €200 £300 ¥400",
        "2024-01-31T12:34:56Z", "+1 (555) 123-4567", "v1.2.3-rc.4", "12abc abc12 a1b2c3", "100% 50°C 3/4 ½ ¾",
        "٠١٢٣٤٥٦٧٨٩ ۱۲۳", "१२३४ ๑๒๓", "１２３ ４５６", "²³ ₁₂ ⅫⅣ ⑳", "一二三 壹贰叁",
        # accents, combining marks, many scripts
        "café naïve résumé façade jalapeño Ångström Øresund straße",
        "e\u0301 a\u0300 n\u0303 o\u0308 decomposed", "Ελληνικά γράμματα", "Привет, мир! Ёлка",
        "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया हिन्दी", "สวัสดีชาวโลก", "안녕하세요 세계",
        "こんにちは世界、カタカナ", "你好，世界！我们在本地运行大语言模型。", "在本地运行大语言模型 hinges on 克服内存带宽瓶颈",
        "Tiếng Việt có dấu", "ქართული ენა", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙", "ℌℑℜ ℵ ℶ",
        # emoji: single, ZWJ sequences, flags, skin tones, keycaps
        "emoji 🤖🦙 test", "😀😃😄😁", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "👍🏽👋🏿", "1️⃣ #️⃣", "❤️‍🔥", "🫠🫨",
        # symbols, punctuation runs
        "→ ← ↑ ↓ ∑ ∏ √ ∞ ≠ ≤ ≥ © ® ™ § ¶ •", "!!!??? ... ,,, ;;; :::", "<<>> [[]] {{}} (())", "a--b---c----d",
        "~~~ ^^^ ||| &&& *** ### @@@ $$$ %%% +++ === ___", "«guillemets» „Anführung“ “quotes” ‘single’",
        "――—–‐", "…⋯", "¡Hola! ¿Qué tal?", "「括弧」『二重』【隅付き】",
        # invisible and unusual characters
        "zero\u200bwidth\u200cnon\u200djoiner", "nb\u00a0sp\u00a0x", "ideographic\u3000space",
        "line\u2028sep\u2029para",
        "nel\x85x", "ctrl\x01\x02\x1c\x1d\x1e\x1fend", "bom\ufeffx", "private\ue000\uf8ff", "soft\u00adhyphen",
        "tab\tseparated\tvalues", "\x0bvt\x0cff", "del\x7fx",
        # Unicode-version sensitive: assigned in 15.0/15.1 (llama.cpp's table) vs later (Unicode 16: Garay, new emoji)
        "\u2ffc\u2ffd\u31ef 15.1", "\U0001fae8\U0001fa8f new emoji", "\U00010d50\U00010d51\U00010d52 garay",
        "\U0001fae9x",
        "\U0002ebf0\U0002ebf1 cjk ext i", "\U00011f04\U00011f05 kawi",
        # ... glued to ASCII letters, where letter-or-not decides the split
        "a\U0002ebf0b", "k\U00011f04k", "x\U00010d50y", "q\U0001fae9q", "9\U00010d40 \U00010d409",
        # code
        "def f(x):\n    return x**2  # square",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        "const f = async (x) => { await g(x?.y ?? 0); };",
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
        "<div class=\"a\"><p>Hello</p></div>", "{\"key\": [1, 2.5, null, true], \"k2\": {\"n\": \"v\"}}",
        "if x == 1:\n\tpass\nelif y:\n        z()\n", "$ ls -la /usr/bin | grep -E '^d' > out.txt 2>&1",
        "C:\\Users\\name\\file.txt", "https://example.com/path?q=1&r=two#frag", "user.name+tag@example.co.uk",
        "regex: ^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", "a_b-c.d/e\\f:g;h", "x+=1;y-=2;z*=3",
        "    indented\n        more\n            most", "trailing spaces   \nnext", "\n\nleading newlines",
        "   leading spaces", "\t\tleading tabs", "a\r\nb\r\nc", "mixed \t \n \r\n end", " \n \n ", "\n \n",
        # markdown / chat-ish text
        "# Title\n\n## Sub\n\n- item 1\n- item 2\n\n> quote\n\n```python\nprint(1)\n```",
        "| a | b |\n|---|---|\n| 1 | 2 |", "**bold** _it_ `code` [link](http://x.y)",
        # long inputs
        "a" * 100, "a" * 1000, "ab" * 300, "9" * 200, " " * 100, "\n" * 50, "🙂" * 40, "语" * 200,
        "The model streams tokens. " * 20, "x " * 150, "aaa bbb " * 60,
    ]
    # whitespace runs of every length, alone and between words
    for k in range(1, 41):
        s.append("x" + " " * k + "y")
    for k in range(1, 33):
        s.append(" " * k)
    for k in range(1, 17):
        s.append("a" + "\t" * k + "b")
        s.append("a" + "\n" * k + "b")
        s.append(("\n " * k) + "z")
        s.append("w" + " \t" * k)
    for mix in (" \n", "\n ", "\t\n", "\n\t", " \t ", "\r\n", "\n\r", " \r\n ", "\n\n ", "  \n\n  "):
        s.append("start" + mix + "end")
        s.append(mix + "lead")
        s.append("trail" + mix)
    # special-token strings (some exist in one vocabulary only), partial and adjacent ones
    s += [
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", "<|im_start|><|im_end|>", "<|im_end|>",
        "<|endoftext|>", "text<|endoftext|>more", "<|im_", "im_end|>", "<<|im_end|>>", "< |im_end| >",
        "<|im_start|>system\nYou are helpful.<|im_end|>", "<repo_name>r<file_sep>f<filename>n", "<reponame>x",
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>", "<start_of_turn>",
        "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused0>", "<unused12><unused123>", "<bos><bos>text",
        "<s>", "</s>", "<s>[INST] hi [/INST]</s>", "[multimodal]", "<table><tr><td>x</td></tr></table>",
        "<h1>Title</h1><strong>bold</strong><em>e</em>", "<b>b</b><i>i</i><u>u</u><s>s</s><sub>1</sub><sup>2</sup>",
        "<blockquote>q</blockquote>", "a<eos>b", " <eos> ", "<start_of_image>", "<end_of_image>",
        "<|im_start|>  spaced  <|im_end|>  ", "\n<|im_end|>\n", "<|endoftext|><|endoftext|>",
        "x   <mask>", "\t\n <mask>y", "<mask> <mask>", " <mask>", "a \t<mask>\n b",
    ]
    # sentences in many styles to exercise merges broadly
    words = ["token", "tokenizer", "tokenization", "international", "internationalization", "unbelievable",
             "antidisestablishmentarianism", "pneumonoultramicroscopic", "über", "naïveté", "coöperate"]
    for w in words:
        s.append(w)
        s.append(" " + w)
        s.append(w.upper())
        s.append(w.capitalize() + "s.")
    return s


_QUIET = None
MODES = [(True, False), (False, False), (True, True), (False, True)]
VARIANT_MODES = [(True, False), (False, True)]


class LlamaVocab:
    """llama.cpp's vocabulary through llama-cpp-python's C API (vocab_only load: no weights)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp as L  # dev-only dependency

        self.L = L
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n = L.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def piece(self, tid: int, special: bool) -> bytes:
        cap = 64
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self.L.llama_token_to_piece(self.vocab, tid, buf, cap, 0, special)
            if n >= 0:
                return buf.raw[:n]
            cap = -n

    def facts(self) -> dict:
        L, v = self.L, self.vocab
        none = -1

        def opt(x: int) -> int | None:
            return None if x == none else int(x)

        h_special, h_plain = hashlib.sha256(), hashlib.sha256()
        for i in range(self.n):
            for h, sp in ((h_special, True), (h_plain, False)):
                p = self.piece(i, sp)
                h.update(len(p).to_bytes(4, "little") + p)
        return {
            "n_vocab": self.n,
            "bos_id": opt(L.llama_vocab_bos(v)), "eos_id": opt(L.llama_vocab_eos(v)),
            "eot_id": opt(L.llama_vocab_eot(v)),
            "add_bos": bool(L.llama_vocab_get_add_bos(v)), "add_eos": bool(L.llama_vocab_get_add_eos(v)),
            "eog_ids": [i for i in range(self.n) if L.llama_vocab_is_eog(v, i)],
            "control_ids": [i for i in range(self.n) if L.llama_vocab_is_control(v, i)],
            "attrs_sha256": hashlib.sha256(
                b"".join(int(L.llama_vocab_get_attr(v, i)).to_bytes(4, "little") for i in range(self.n))
            ).hexdigest(),
            "pieces_special_sha256": h_special.hexdigest(),
            "pieces_plain_sha256": h_plain.hexdigest(),
            "pieces_sample": {str(i): self.piece(i, True).hex() for i in range(0, self.n, max(1, self.n // 300))},
        }

    def close(self) -> None:
        self.L.llama_model_free(self.model)


# Variant vocabularies: base model, metadata keys set, metadata keys dropped. The edits are written into each
# fixture ("base", "set", "drop") and the tests apply them to the base model's metadata to rebuild the vocabulary.
VARIANTS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    # the BPE pre-tokenizer regex variants, on SmolLM2's tokens and merges; add_bos_token dropped so that
    # llama.cpp's per-variant default applies (true for llama-bpe)
    "bpe_llama-bpe": ("smollm2", {"tokenizer.ggml.pre": "llama-bpe"}, ("tokenizer.ggml.add_bos_token",)),
    "bpe_qwen2": ("smollm2", {"tokenizer.ggml.pre": "qwen2"}, ("tokenizer.ggml.add_bos_token",)),
    "bpe_default": ("smollm2", {"tokenizer.ggml.pre": "default"}, ("tokenizer.ggml.add_bos_token",)),
    "bpe_gpt-2": ("smollm2", {"tokenizer.ggml.pre": "gpt-2"}, ("tokenizer.ggml.add_bos_token",)),
    # a jina-v2-de pre-tokenizer name gives <mask> the LSTRIP attribute (it eats the whitespace before it); for
    # an SPM vocabulary llama.cpp does not interpret the name otherwise
    "spm_lstrip-mask": ("gemma3", {"tokenizer.ggml.pre": "jina-v2-de"}, ()),
    # SentencePiece with llama.cpp's defaults: add_space_prefix, add_bos and add_eos absent
    "spm_defaults": ("gemma3", {}, ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token",
                                    "tokenizer.ggml.add_eos_token")),
}


def variant_metadata(base: dict, set_keys: dict, drop: tuple[str, ...]) -> dict:
    md = {k: v for k, v in base.items() if k not in drop}
    md.update(set_keys)
    return md


def write_vocab_gguf(path: Path, metadata: dict) -> None:
    """A tensor-less GGUF holding `metadata` (enough for llama.cpp's vocab_only load)."""
    import numpy as np
    from gguf import GGUFWriter

    arch = metadata["general.architecture"]
    w = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if key in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, np.ndarray):  # token_type (int32) and scores (float32)
            w.add_array(key, value.tolist())
        elif isinstance(value, (list, tuple)):
            w.add_array(key, list(value))
        else:
            raise TypeError(f"{key}: {type(value)}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_metadata(path: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from ember.gguf import open_gguf

    return dict(open_gguf(path).metadata)


def make(vocab: LlamaVocab, strings: list[str], modes: list[tuple[bool, bool]], source: dict) -> dict:
    cases = []
    for text in strings:
        case = {"text": text}
        for add_special, parse_special in modes:
            case[f"ids_{int(add_special)}{int(parse_special)}"] = vocab.tokenize(text, add_special, parse_special)
        cases.append(case)
    return {
        "generator": "scripts/make_tokenizer_fixtures.py with llama-cpp-python 0.3.36 (vendored llama.cpp)",
        "source": source,
        "modes": [f"{int(a)}{int(p)}" for a, p in modes],
        "modes_note": "key ids_AP: A = add_special, P = parse_special",
        **vocab.facts(),
        "cases": cases,
    }


def dump(path: Path, data: dict) -> None:
    # One line per key and per case: diffs of a regenerated fixture stay readable.
    lines = [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in data.items() if k != "cases"]
    cases = ",\n".join(json.dumps(c, ensure_ascii=False) for c in data["cases"])
    path.write_text("{\n" + ",\n".join(lines) + ',\n"cases": [\n' + cases + "\n]}\n")
    print(f"wrote {path} ({len(data['cases'])} strings)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", type=Path, default=Path("/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--gemma3", type=Path, default=Path("/tmp/models/gemma-3-270m-q4_k_m.gguf"))
    args = ap.parse_args()
    import llama_cpp

    assert llama_cpp.__version__ == "0.3.36", llama_cpp.__version__
    global _QUIET  # llama.cpp keeps calling the callback: it must outlive this function
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    strings = corpus()
    for name, path in (("smollm2", args.smollm2), ("gemma3", args.gemma3)):
        vocab = LlamaVocab(path)
        dump(FIXTURES / f"tokenizer_{name}.json", make(vocab, strings, MODES, {"gguf": path.name}))
        vocab.close()
    bases = {"smollm2": read_metadata(args.smollm2), "gemma3": read_metadata(args.gemma3)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (base, set_keys, drop) in VARIANTS.items():
            gguf_path = Path(tmp) / f"vocab-{name}.gguf"
            write_vocab_gguf(gguf_path, variant_metadata(bases[base], set_keys, drop))
            vocab = LlamaVocab(gguf_path)
            source = {"base": base, "set": set_keys, "drop": list(drop)}
            dump(FIXTURES / f"tokenizer_{name}.json", make(vocab, strings, VARIANT_MODES, source))
            vocab.close()

if __name__ == "__main__":
    main()
