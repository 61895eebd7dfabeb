"""Prompts: the file formats, a tiny WordLevel tokenizer with a chat template written here, token ids
hand-computed from the template, and `trace capture` on text / chat prompts decoding exactly what
the official rules (tests/official_rules.py) give for those token ids."""

import json

import pytest

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from official_rules import official_generate, write_official_checkpoint  # noqa: E402
from tidesim_runtime.reference.checkpoint import load_checkpoint  # noqa: E402
from tidesim_runtime.reference.model import build_model  # noqa: E402
from tidesim_runtime.reference.prompts import (  # noqa: E402
    RawPrompt,
    load_tokenizer,
    prepare_prompts,
    read_prompt_file,
)

from tidesim.cli import main  # noqa: E402
from tidesim.errors import InputError  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402
from tidesim.trace.io import read_trace  # noqa: E402

SPEC = PRESETS["tiny"]
WORDS = ["[UNK]", "hello", "world", "USER", "ASSISTANT", "SYSTEM", "write", "code", "be", "brief", "!"]
SPECIAL = {"<role>": 505, "</role>": 506, "<|role_end|>": 507, "<|endoftext|>": 510, "<|mask|>": 511}
TEMPLATE = ("{% for m in messages %}<role>{{ m['role'] | upper }}</role>{{ m['content'] }}<|role_end|>{% endfor %}"
            "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}")


def write_tokenizer(folder, template=TEMPLATE, where="config"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)} | SPECIAL
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "mask_token": {"content": "<|mask|>"}}
    if where == "config" and template is not None:
        config["chat_template"] = template
    elif where == "list":
        config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    elif where == "file":
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_file_formats(tmp_path):
    cases = {
        "ids.txt": ("1 2 3\n\n4 5\n", [RawPrompt(tokens=[1, 2, 3]), RawPrompt(tokens=[4, 5])]),
        "ids.json": ("[[1, 2], [3]]", [RawPrompt(tokens=[1, 2]), RawPrompt(tokens=[3])]),
        "text.txt": ("hello world\n42\n", [RawPrompt(text="hello world"), RawPrompt(text="42")]),
        "p.jsonl": ('{"prompt": "hello"}\n{"text": "world"}\n{"messages": [{"role": "user", "content": "hi"}]}\n',
                    [RawPrompt(text="hello"), RawPrompt(text="world"),
                     RawPrompt(messages=[{"role": "user", "content": "hi"}])]),
    }
    for name, (content, want) in cases.items():
        (tmp_path / name).write_text(content)
        assert read_prompt_file(tmp_path / name) == want, name


@pytest.mark.parametrize("content, words", [
    ('{"prompt": "a"}\n{"nope": 1}\n', "line 2: expected a prompt, text or messages field"),
    ('{"messages": []}\n', "line 1: messages must be a non-empty list"),
    ('{"prompt": 3}\n', "prompt must be a string"), ("[[1, true]]", "True, not a token id"),
    ("\n\n", "holds no prompt"),
])
def test_bad_files_are_named(tmp_path, content, words):
    (tmp_path / "p").write_text(content)
    with pytest.raises(InputError, match=words.replace("[", r"\[")):
        read_prompt_file(tmp_path / "p")


@pytest.mark.parametrize("where", ["config", "list", "file"])
def test_chat_template_renders_and_tokenizes_hand_computed(tmp_path, where):
    tok = load_tokenizer(write_tokenizer(tmp_path / "tok", where=where))
    out = prepare_prompts([RawPrompt(text="hello world")], tok)
    # <role> USER </role> hello world <|role_end|> <role> ASSISTANT </role>
    assert out[0].tokens == [505, 3, 506, 1, 2, 507, 505, 4, 506] and out[0].kind == "text"
    assert out[0].text == "<role> USER </role> hello world <|role_end|> <role> ASSISTANT </role>"  # WordLevel joins
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write code !"}]
    out = prepare_prompts([RawPrompt(messages=chat)], tok)
    assert out[0].tokens == [505, 5, 506, 8, 9, 507, 505, 3, 506, 6, 7, 10, 507, 505, 4, 506]
    assert out[0].kind == "chat"


def test_without_chat_template_and_token_prompts(tmp_path):
    tok = load_tokenizer(write_tokenizer(tmp_path / "tok"))
    out = prepare_prompts([RawPrompt(text="hello world"), RawPrompt(tokens=[3, 1])], tok, chat_template=False)
    assert out[0].tokens == [1, 2] and out[1].tokens == [3, 1] and out[1].text == "USER hello"
    with pytest.raises(InputError, match="prompt 0 is a chat .* drop --no-chat-template"):
        prepare_prompts([RawPrompt(messages=[{"role": "user", "content": "hi"}])], tok, chat_template=False)
    with pytest.raises(InputError, match="prompt 1 is text, but there is no tokenizer.json"):
        prepare_prompts([RawPrompt(tokens=[1]), RawPrompt(text="hi")], None)
    bare = load_tokenizer(write_tokenizer(tmp_path / "bare", template=None))
    with pytest.raises(InputError, match="no chat template"):
        prepare_prompts([RawPrompt(text="hi")], bare)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    model = build_model(SPEC, torch.float32, seed=8)
    write_official_checkpoint(folder, SPEC, model.state_dict())
    write_tokenizer(folder)
    return folder


@pytest.mark.parametrize("chat", [True, False])
def test_capture_of_text_and_chat_prompts_follows_the_official_rules(checkpoint, tmp_path, capsys, chat):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "hello world"}]
    if chat:
        lines.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "code"}]})
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "t.parquet"
    args = ["trace", "capture", "--model-dir", str(checkpoint), "--prompts", str(prompts), "--gen-length", "16",
            "--block-length", "8", "--threshold", "0.9", "-o", str(out), "--json"]
    assert main(args + ([] if chat else ["--no-chat-template"])) == 0
    report = json.loads(capsys.readouterr().out)
    trace = read_trace(out)
    tok = load_tokenizer(checkpoint)
    model = load_checkpoint(checkpoint, torch.float32)
    for i, meta in enumerate(trace.meta.prompts):
        raw = lines[i]
        ids = prepare_prompts([RawPrompt(text=raw.get("prompt"), messages=raw.get("messages"))], tok, chat)[0].tokens
        assert meta["tokens"] == len(ids) and meta["text"] == tok.decode(ids)
        ref = official_generate(lambda x, p, m: model(x, p, m)[0], ids, gen_length=16, block_length=8,
                                threshold=0.9, eos_id=SPEC.eos_token_id, mask_id=SPEC.mask_token_id)
        assert report["tokens"][i] == ref.output and meta["steps_per_block"] == ref.steps_per_block
    assert report["prompt_text"][0].startswith("<role> USER </role>" if chat else "hello")
    assert trace.meta.generator["chat_template"] is chat


def test_capture_refuses_text_without_tokenizer_and_empty_text(checkpoint, tmp_path, capsys):
    bare = tmp_path / "bare"
    write_official_checkpoint(bare, SPEC, build_model(SPEC, seed=1).state_dict())
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    out = tmp_path / "t.parquet"
    assert main(["trace", "capture", "--model-dir", str(bare), "--prompts", str(prompts), "-o", str(out)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err and not out.exists()
    prompts.write_text('{"prompt": ""}\n')
    rc = main(["trace", "capture", "--model-dir", str(checkpoint), "--prompts", str(prompts), "--no-chat-template",
               "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "prompt 0 is empty" in err and err.count("\n") == 1 and not out.exists()
