"""Chat SFT: ``messages`` rows rendered with a chat template (the tokenizer's or
``--chat-template FILE``), the loss on assistant turns only, and the one-line refusals of bad
rows and bad templates (nothing written to the run)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.tiny import VOCAB
from peftcli.training.batching import IGNORE, encode, load_tokenizer
from peftcli.training.chat import resolve_template
from peftcli.training.config import TrainConfig
from peftcli.training.data import load_dataset
from peftcli.training.loop import train

# The tiny word-level tokenizer knows <s>, </s> and w0 … w251: role markers are words.
MARK = {"system": "w0", "user": "w1", "assistant": "w2"}
TEMPLATE = (
    "{% for m in messages %}<s> {{ {'system': 'w0', 'user': 'w1', 'assistant': 'w2'}[m['role']] }} {{ m['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}<s> w2 {% endif %}"
)
TWO_TURNS = [
    {"role": "system", "content": "w10"},
    {"role": "user", "content": "w11 w12"},
    {"role": "assistant", "content": "w13"},
    {"role": "user", "content": "w14"},
    {"role": "assistant", "content": "w15 w16"},
]


def _write(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def _conversations(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"w{10 + i % 9} w{30 + i % 5}"}, {"role": "assistant", "content": f"w{60 + i % 9} w{90 + i % 5}"}]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    (d / "template.jinja").write_text(TEMPLATE)
    return {"template": str(d / "template.jinja"), "chat": _write(d / "chat.jsonl", _conversations(24)), "lm": _write(d / "lm.jsonl", [{"text": "w5 w6"}] * 4)}


def _expected(messages: list[dict]) -> tuple[list[int], list[int]]:
    """The template's output built by hand: per message <s> MARK words </s>; labels on the
    assistant's words and its </s>."""
    index = {w: i for i, w in enumerate(VOCAB)}
    ids, labels = [], []
    for m in messages:
        words = ["<s>", MARK[m["role"]], *m["content"].split(), "</s>"]
        ids += [index[w] for w in words]
        labels += [IGNORE, IGNORE] + ([index[w] for w in words[2:]] if m["role"] == "assistant" else [IGNORE] * (len(words) - 2))
    return ids, labels


def test_messages_rows_are_chat_sft_with_the_loss_on_assistant_turns_only(tiny_llama, files, tmp_path):
    path = _write(tmp_path / "two.jsonl", [{"messages": TWO_TURNS}])
    data = load_dataset(path)
    assert data.task == "sft" and data.chat and data.examples[0].messages == TWO_TURNS
    tok = load_tokenizer(tiny_llama)
    [item] = encode(data, tok, 128, chat_template=TEMPLATE)
    assert (item["input_ids"], item["labels"]) == _expected(TWO_TURNS)
    kept = [i for i, label in enumerate(item["labels"]) if label != IGNORE]
    assert kept == [11, 12, 19, 20, 21]  # w13 </s> of turn 1, w15 w16 </s> of turn 2
    [cut] = encode(data, tok, 12, chat_template=TEMPLATE)
    assert cut["input_ids"] == item["input_ids"][:12] and cut["labels"] == item["labels"][:12]


def test_the_tokenizers_template_is_used_and_chat_template_overrides_it(tiny_llama, files, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_llama, model)
    cfg_path = os.path.join(model, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "chat_template": TEMPLATE.replace("w2", "w3")}, open(cfg_path, "w"))  # its own: assistant is w3
    tok = load_tokenizer(model)
    data = load_dataset(_write(tmp_path / "two.jsonl", [{"messages": TWO_TURNS}]))
    own = encode(data, tok, 128, chat_template=resolve_template(True, None, tok, model))[0]
    ours = encode(data, tok, 128, chat_template=resolve_template(True, files["template"], tok, model))[0]
    assert ours["input_ids"] == _expected(TWO_TURNS)[0]
    assert own["input_ids"] != ours["input_ids"] and VOCAB.index("w3") in own["input_ids"]


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _lora(base, tmp_path, name="run") -> str:
    run = str(tmp_path / name)
    inject(base, "lora", LoraConfig(rank=4), run)
    return run


def test_chat_sft_trains_from_the_cli_packed_or_not(tiny_llama, files, tmp_path):
    for name, extra in (("plain", []), ("packed", ["--packing"])):
        run = _lora(tiny_llama, tmp_path, name)
        r = _cli("train", run, "--data", files["chat"], "--chat-template", files["template"], "--steps", "3", "--batch-size", "4", *extra, "--json", "--quiet")
        assert r.exit_code == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["task"] == "sft" and summary["steps"] == 3 and summary["final_loss"] > 0
        assert json.load(open(os.path.join(run, "train_args.json")))["chat_template"] == files["template"]
    # A resumed run renders with the template it was started with: the same bytes.
    run = _lora(tiny_llama, tmp_path, "resumed")
    train(run, TrainConfig(data=files["chat"], chat_template=files["template"], steps=3, batch_size=4, save_every=1, keep_checkpoints=5))
    again = str(tmp_path / "again")
    shutil.copytree(run, again)
    shutil.rmtree(os.path.join(again, "checkpoints", "step-0000003"))
    train(again, resume=True)
    name = "adapter_model.safetensors"
    assert open(os.path.join(again, name), "rb").read() == open(os.path.join(run, name), "rb").read()


BAD_ROWS = [
    ({"messages": [{"role": "tool", "content": "w5"}, {"role": "assistant", "content": "w6"}]}, "message 1 has role 'tool'"),
    ({"messages": [{"role": "user", "content": "w5"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "content": ["w6"]}]}, "no string 'content'"),
    ({"messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6", "weight": 0}]}, "keys peftcli does not know: weight"),
    ({"messages": "w5"}, "must be a non-empty list"),
    ({"messages": []}, "must be a non-empty list"),
    ({"messages": ["w5"]}, "message 1 is not an object"),
    ({"prompt": "w5", "completion": "w6"}, "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"}], "prompt": "w5"}, "both 'messages' and prompt"),
]


@pytest.mark.parametrize("row, words", BAD_ROWS, ids=[w for _, w in BAD_ROWS])
def test_a_bad_messages_row_is_a_one_line_error_naming_its_line(row, words, tiny_llama, files, tmp_path):
    data = _write(tmp_path / "bad.jsonl", [_conversations(1)[0], row])
    run = _lora(tiny_llama, tmp_path)
    r = _cli("train", run, "--data", data, "--chat-template", files["template"], "--steps", "1")
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {data}:2: ") and words in r.stderr and "(" in r.stderr
    assert not os.path.exists(os.path.join(run, "train_args.json"))


BAD_TEMPLATES = [
    (None, 1, "has no chat template", "--chat-template FILE"),
    ("{{ raise_exception('no system messages') }}", 1, "fails on this conversation: no system messages", "fix the template"),
    ("{% for m in messages %}", 1, "fails on this conversation", "fix the template"),
    ("{% for m in messages[-1:] %}{{ m['content'] }} {% endfor %}", 1, "does not render message 2 (assistant) as an extension", "no rewriting"),
    (TEMPLATE.replace("<s> w2 {% endif", "<s> w3 {% endif"), 1, "does not render message 2 (assistant)", "no rewriting"),  # a wrong generation prompt
    ("missing.jinja", 1, "no such file", "Jinja chat template"),
]


@pytest.mark.parametrize("template, code, words, hint", BAD_TEMPLATES, ids=[w for _, _, w, _ in BAD_TEMPLATES])
def test_a_missing_or_failing_template_is_a_one_line_error(template, code, words, hint, tiny_llama, files, tmp_path):
    run = _lora(tiny_llama, tmp_path)
    args = []
    if template is not None:
        path = tmp_path / "t.jinja"
        if template != "missing.jinja":
            path.write_text(template)
        args = ["--chat-template", path]
    r = _cli("train", run, "--data", files["chat"], *args, "--steps", "1")
    assert r.exit_code == code, r.output
    assert r.stderr.count("\n") == 1 and words in r.stderr and hint in r.stderr
    assert not os.path.exists(os.path.join(run, "train_args.json"))


def test_chat_template_with_rows_that_are_not_messages_is_refused(tiny_llama, files, tmp_path):
    run = _lora(tiny_llama, tmp_path)
    r = _cli("train", run, "--data", files["lm"], "--chat-template", files["template"], "--steps", "1")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "messages rows" in r.stderr
    assert not os.path.exists(os.path.join(run, "train_args.json"))
