"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` plus the two chat templates we need, as plain Python.

What is notable here:
- Two sources: a Hugging Face ``tokenizer.json``, or the ``tokenizer.ggml.*`` metadata of a GGUF file (a byte-level
  BPE: vocabulary, merges, token types). For SmolLM2 (``tokenizer.ggml.pre = "smollm"``) the pre-tokenizer splits
  every digit on its own before the byte-level split, as SmolLM2's own ``tokenizer.json`` and llama.cpp do. (Its
  vocabulary has no multi-digit token, so a plain byte-level split, which transformers' GGUF loader uses, happens to
  give the same ids.)
- Chat templates are functions, not jinja: ``llama3_chat_text`` (Llama-3.x: system header with the knowledge cut-off
  and a pinned "Today Date") and ``chatml_chat_text`` (SmolLM2: a default system prompt when none is given).
  ``chat()`` encodes the rendered text; special tokens in it are matched whole, as in ``apply_chat_template``.
- ``encode`` never adds special tokens (no BOS): prompts get BOS from the chat template when the model wants one.
- A tokenizer can know more ids than the model's embedding has rows (the Llama-3.2 ``tokenizer.json`` of the vision
  model has ``<|image|>`` = 128256, the text model 128256 rows). ``fit_vocab(n)`` drops such ids when they are
  added/special tokens (with a warning naming them: their text is then tokenized as ordinary text) and refuses
  (``ValueError``) when a regular vocabulary id is out of range, because then tokenizer and model do not belong
  together. ``atmanrl.model.load`` always calls it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

log = logging.getLogger(__name__)

# The official Llama-3.2 template fills "Today Date" with the current date when it can, else "26 Jul 2024". We pin
# the latter so prompts (and therefore rollouts and tests) do not change with the calendar.
LLAMA3_DATE = "26 Jul 2024"

# llama.cpp token types stored in `tokenizer.ggml.token_type`.
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# Pre-tokenizer split of Llama-3 (tiktoken-style; numbers in groups of up to 3 digits).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf_pre_tokenizer(pre: str, path: str):
    """The pre-tokenizer named by `tokenizer.ggml.pre` (llama.cpp's names)."""
    if pre == "smollm":  # SmolLM/SmolLM2 (StarCoder-style): every digit alone, then GPT-2 byte-level split
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in ("llama3", "llama-v3", "llama-bpe"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise ValueError(
        f"{path}: GGUF tokenizer pre-tokenizer {pre!r} is not supported (supported: smollm, llama-bpe, gpt2). "
        "Use the model's tokenizer.json instead (load an HF directory), or add the split rule to "
        "atmanrl/model/tokenizer.py."
    )


def llama3_chat_text(
    messages: list[dict], add_generation_prompt: bool = True, date: str = LLAMA3_DATE, bos: str = "<|begin_of_text|>"
) -> str:
    """The Llama-3.1/3.2 instruct template (without tools), as the official jinja renders it.

    The system header is always present; it carries the knowledge cut-off and ``date``, then the system message
    (if the first message is one). Message contents are stripped, as the template's ``| trim`` does.
    """
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    text = (
        f"{bos}<|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>"
    )
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    if add_generation_prompt:
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return text


def chatml_chat_text(
    messages: list[dict], add_generation_prompt: bool = True, default_system: str | None = None
) -> str:
    """ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``); SmolLM2's template inserts ``default_system`` when the
    conversation does not start with a system message. Contents are not stripped (the template does not)."""
    text = ""
    if messages and messages[0]["role"] != "system" and default_system is not None:
        text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def _chatml_default_system(template: str | None) -> str | None:
    """The default system prompt a ChatML jinja template writes when none is given (SmolLM2 has one)."""
    if not template:
        return None
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, flags=re.S)
    return m.group(1) if m else None


class Tokenizer:
    """Encode/decode text and render chats for one model.

    ``template`` is ``"llama3"``, ``"chatml"`` or ``None`` (then ``chat`` raises); by default it is chosen from the
    special tokens the vocabulary has.
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        template: str | None = "auto",
        default_system: str | None = None,
        date: str = LLAMA3_DATE,
        source: str = "<in memory>",
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # the source's jinja text, kept only so that `save` can write it back
        self._vocab_size = None
        self.source = source
        self.date = date
        self.default_system = default_system
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if template == "auto":
            template = "llama3" if "<|start_header_id|>" in vocab else "chatml" if "<|im_start|>" in vocab else None
        self.template = template
        if template == "llama3":
            bos = bos or "<|begin_of_text|>"
            eos = eos or "<|end_of_text|>"
            stops = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]
        elif template == "chatml":
            stops = ["<|im_end|>", eos]
        else:
            stops = [eos]
        self.bos_id = self.token_id(bos) if bos else None
        self.eos_id = self.token_id(eos) if eos else None
        # Padding: a real pad token if there is one, else EOS (pad positions are masked anyway).
        self.pad_id = self.token_id(pad) if pad and pad in vocab else self.eos_id
        # End-of-turn ids that stop generation (deduplicated, order kept).
        self.stop_ids = list(dict.fromkeys(vocab[t] for t in stops if t is not None and t in vocab))

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "Tokenizer":
        """From a ``tokenizer.json``; special tokens and the chat template come from the ``tokenizer_config.json``
        next to it when there is one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Tokenizer file {path} not found. A Hugging Face model directory must contain tokenizer.json "
                "(copy it from the model's repository)."
            )
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library's error names neither the file nor the cause
            raise ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable tokenizer.json ({e}); it is "
                             "empty, truncated or damaged. Copy it again from the model's repository.") from None
        cfg_path = path.parent / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); it is truncated or damaged. Copy it again from "
                             "the model's repository, or delete it (special tokens then come from tokenizer.json "
                             "alone).") from None

        def name(key):  # tokenizer_config writes special tokens as strings or as {"content": ...}
            v = cfg.get(key)
            return v.get("content") if isinstance(v, dict) else v

        template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        kwargs.setdefault("default_system", _chatml_default_system(template))
        return cls(tok, bos=name("bos_token"), eos=name("eos_token"), pad=name("pad_token"), source=str(path),
                   chat_template=template, **kwargs)

    @classmethod
    def from_gguf_fields(cls, fields: dict, path: str = "<gguf>", **kwargs) -> "Tokenizer":
        """From the ``tokenizer.*`` metadata of a GGUF file (``fields``: key -> decoded value)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2', which Llama-3 "
                "and SmolLM use). Load a Hugging Face directory with tokenizer.json instead."
            )
        tokens = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        tok = _HFTokenizer(
            models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False)
        )
        tok.pre_tokenizer = _gguf_pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"), path)
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, <|endoftext|>, ...) must be matched whole in text, never split into bytes;
        # user-defined ones are matched whole too, but are not "special" (decode keeps them when skipping specials).
        types = fields.get("tokenizer.ggml.token_type") or [0] * len(tokens)
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _GGUF_CONTROL]
        )
        tok.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _GGUF_USER_DEFINED]
        )

        def name(key):
            i = fields.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None else None

        kwargs.setdefault("default_system", _chatml_default_system(fields.get("tokenizer.chat_template")))
        return cls(tok, bos=name("bos"), eos=name("eos"), pad=name("padding"), source=str(path),
                   chat_template=fields.get("tokenizer.chat_template"), **kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (special tokens, the jinja chat template when the
        source had one) into a model directory, so that ``load(directory)`` and ``transformers`` read it back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))

        def token(i):
            return self.tokenizer.id_to_token(i) if i is not None else None

        config = {"bos_token": token(self.bos_id), "eos_token": token(self.eos_id), "pad_token": token(self.pad_id)}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    # -- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce or decode (largest id + 1)."""
        if self._vocab_size is None:
            self._vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        return self._vocab_size

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise KeyError(f"Token {token!r} is not in the vocabulary of {self.source}")
        return i

    def fit_vocab(self, num_embeddings: int) -> list[str]:
        """Make sure every id this tokenizer produces is ``< num_embeddings`` (the model's embedding rows).

        Out-of-range *added* tokens (e.g. ``<|image|>`` of the Llama-3.2 vision tokenizer) are removed, with a
        warning; their text is afterwards tokenized as ordinary text. Returns the removed tokens. An out-of-range id
        of the base vocabulary, or an out-of-range BOS, EOS or stop token, means the tokenizer belongs to another
        model: ``ValueError``. An out-of-range padding token falls back to EOS (padded positions are masked).
        """
        added = self.tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        base = self.tokenizer.get_vocab(with_added_tokens=False)
        bad = sorted((i, t) for t, i in base.items() if i >= num_embeddings and i not in added)
        if bad:
            raise ValueError(
                f"Tokenizer {self.source} has {len(bad)} regular vocabulary ids >= the model's {num_embeddings} "
                f"embedding rows (first: {bad[:3]}); tokenizer and model do not belong together. Use the "
                "tokenizer.json of the same model."
            )
        dropped = sorted((i, a.content) for i, a in added.items() if i >= num_embeddings)
        if not dropped:
            return []
        # Tokens the model cannot do without: BOS, EOS and the end-of-turn ids that stop generation. Dropping them
        # would leave ids outside the embedding (IndexError later) or a generation that never stops.
        needed = [(role, i) for role, i in (("bos", self.bos_id), ("eos", self.eos_id),
                                            *(("stop", i) for i in self.stop_ids)) if i is not None]
        lost = [f"{role} {self.tokenizer.id_to_token(i)}={i}" for role, i in dict.fromkeys(needed)
                if i >= num_embeddings]
        if lost:
            raise ValueError(
                f"Tokenizer {self.source}: the model has only {num_embeddings} embedding rows, so its special tokens "
                f"{', '.join(lost)} have no embedding; without them prompts lose their markers and generation never "
                "stops. Tokenizer and model do not belong together: use the tokenizer.json of the same model."
            )
        log.warning(
            "Tokenizer %s knows %d ids but the model embeds only %d; removing the added tokens %s (their text is "
            "now tokenized as ordinary text).",
            self.source, self.vocab_size, num_embeddings, ", ".join(f"{t}={i}" for i, t in dropped),
        )
        # `tokenizers` cannot remove an added token in place: edit its JSON form and rebuild.
        spec = json.loads(self.tokenizer.to_str())
        spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < num_embeddings]
        spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i < num_embeddings}
        self.tokenizer = _HFTokenizer.from_str(json.dumps(spec))
        self._vocab_size = None
        self.stop_ids = [i for i in self.stop_ids if i < num_embeddings]
        if self.pad_id is not None and self.pad_id >= num_embeddings:  # padded positions are masked: EOS will do
            log.warning("Tokenizer %s: the padding token id %d is outside the model's %d embedding rows; padding "
                        "with EOS (%d) instead.", self.source, self.pad_id, num_embeddings, self.eos_id)
            self.pad_id = self.eos_id
        return [t for _, t in dropped]

    # -- text <-> ids -------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added. Special-token strings in ``text`` become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with this model's chat template (a string with special-token markers)."""
        if self.template == "llama3":
            return llama3_chat_text(messages, add_generation_prompt, date=self.date)
        if self.template == "chatml":
            return chatml_chat_text(messages, add_generation_prompt, default_system=self.default_system)
        raise ValueError(
            f"Tokenizer {self.source} has neither Llama-3 (<|start_header_id|>) nor ChatML (<|im_start|>) special "
            "tokens, so no chat template applies; pass template='llama3' or 'chatml' explicitly if it should."
        )

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation (``messages``: dicts with "role" and "content")."""
        return self.encode(self.chat_text(messages, add_generation_prompt))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, template={self.template!r})"
