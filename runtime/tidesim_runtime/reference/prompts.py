"""Prompts for a capture: token ids, or text through the checkpoint's own tokenizer and chat template.

A prompts file holds one of:
- a JSON list of lists of token ids;
- JSONL: one JSON object per line, with a `prompt` or `text` string, or a chat `messages` list
  of {"role", "content"} objects;
- plain lines: token ids separated by spaces when every non-empty line is made of integers,
  otherwise one text prompt per line.

Text is tokenized with the checkpoint folder's tokenizer.json (the `tokenizers` library). By
default a text prompt becomes the chat [{"role": "user", "content": text}] and every chat is
rendered with the chat template of tokenizer_config.json (or chat_template.jinja) with
add_generation_prompt=True, as the TIDE evaluation does, then tokenized without adding special
tokens (the template writes them); `chat_template=False` tokenizes the text as it is, with the
tokenizer's own special tokens. The decoded text of every prompt is kept (Prompt.text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidesim.errors import InputError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "sep_token", "cls_token")


@dataclass(frozen=True)
class RawPrompt:
    """One prompt as the file gives it: token ids, a text, or chat messages (exactly one set)."""

    tokens: list[int] | None = None
    text: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def kind(self) -> str:
        return "tokens" if self.tokens is not None else "chat" if self.messages is not None else "text"


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to decode: its token ids, their decoded text (None without a tokenizer) and
    where it came from (tokens, text or chat)."""

    tokens: list[int]
    text: str | None
    kind: str


def read_prompt_file(path: str | Path, flag: str = "--prompts") -> list[RawPrompt]:
    """Parse a prompts file (formats in the module docstring); InputError names the line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not UTF-8 text") from None
    where = f"{flag} {path}"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"{where}: holds no prompt")
    if text.lstrip().startswith("["):
        return _json_token_lists(text, where)
    if all(line.lstrip().startswith("{") for _, line in lines):
        return [_jsonl_prompt(line, f"{where} line {n}") for n, line in lines]
    if all(_is_int_line(line) for _, line in lines):
        return [RawPrompt(tokens=[int(t) for t in line.split()]) for _, line in lines]
    return [RawPrompt(text=line) for _, line in lines]


def _is_int_line(line: str) -> bool:
    try:
        [int(t) for t in line.split()]
    except ValueError:
        return False
    return True


def _json_token_lists(text: str, where: str) -> list[RawPrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(q, list) for q in data):
        raise InputError(f"{where}: expected a JSON list of lists of token ids")
    if not data:
        raise InputError(f"{where}: holds no prompt")
    for i, q in enumerate(data):
        bad = [t for t in q if not isinstance(t, int) or isinstance(t, bool)]
        if bad:
            raise InputError(f"{where}: prompt {i} has {bad[0]!r}, not a token id")
    return [RawPrompt(tokens=list(q)) for q in data]


def _jsonl_prompt(line: str, where: str) -> RawPrompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with a prompt, text or messages field")
    if "messages" in obj:
        msgs = obj["messages"]
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise InputError(f"{where}: messages must be a non-empty list of {{\"role\": str, \"content\": str}}")
        return RawPrompt(messages=[{"role": m["role"], "content": m["content"]} for m in msgs])
    for key in ("prompt", "text"):
        if key in obj:
            if not isinstance(obj[key], str):
                raise InputError(f"{where}: {key} must be a string, got {type(obj[key]).__name__}")
            return RawPrompt(text=obj[key])
    raise InputError(f"{where}: expected a prompt, text or messages field, got {sorted(obj)}")


class CheckpointTokenizer:
    """The tokenizer and chat template of a checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InputError("text prompts need the tokenizers package; install it with: "
                             "pip install 'tidesim[runtime]'") from None
        path = folder / TOKENIZER_FILE
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise InputError(f"{path}: not a readable tokenizer ({str(exc).splitlines()[0][:120]})") from None
        self.config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).exists() else {}
        self.template = _chat_template(folder, self.config)
        self.folder = folder

    def encode(self, text: str, special_tokens: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat rendered by the checkpoint's template with the generation prompt added."""
        if self.template is None:
            raise InputError(f"{self.folder}: no chat template in {TOKENIZER_CONFIG} or {TEMPLATE_FILE}; "
                             "give --no-chat-template to tokenize the text as it is")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InputError(f"{self.folder}: the chat template refused the prompt: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        specials = {k: _token_text(self.config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        try:
            return env.from_string(self.template).render(messages=messages, add_generation_prompt=True, **specials)
        except jinja2.TemplateError as exc:
            raise InputError(f"{self.folder}: the chat template does not render ({exc})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, else tokenizer_config's chat_template
    (a string, or a list of named templates, of which `default`)."""
    if (folder / TEMPLATE_FILE).exists():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") is not None else None
    return value if isinstance(value, str) else None


def load_tokenizer(folder: str | Path | None) -> CheckpointTokenizer | None:
    """The folder's tokenizer, or None when there is no folder or no tokenizer.json in it."""
    if folder is None or not (Path(folder) / TOKENIZER_FILE).exists():
        return None
    return CheckpointTokenizer(Path(folder))


def prepare_prompts(raw: list[RawPrompt], tokenizer: CheckpointTokenizer | None, chat_template: bool = True,
                    where: str = "--prompts") -> list[Prompt]:
    """Token ids (and decoded text) of every prompt; InputError when text comes without a tokenizer."""
    out: list[Prompt] = []
    for i, r in enumerate(raw):
        if r.tokens is not None:
            text = tokenizer.decode(r.tokens) if tokenizer is not None else None
            out.append(Prompt(list(r.tokens), text, "tokens"))
            continue
        if tokenizer is None:
            raise InputError(f"{where}: prompt {i} is text, but there is no {TOKENIZER_FILE} to tokenize it; "
                             "give --model-dir a checkpoint folder with its tokenizer, or token ids")
        if r.messages is not None and not chat_template:
            raise InputError(f"{where}: prompt {i} is a chat (messages), which needs the chat template; "
                             "drop --no-chat-template")
        if chat_template:
            messages = r.messages if r.messages is not None else [{"role": "user", "content": r.text or ""}]
            rendered = tokenizer.render_chat(messages)
            ids = tokenizer.encode(rendered, special_tokens=False)
        else:
            ids = tokenizer.encode(r.text or "", special_tokens=True)
        out.append(Prompt(ids, tokenizer.decode(ids), r.kind))
    return out
