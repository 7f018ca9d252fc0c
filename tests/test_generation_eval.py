"""Generation evaluation: ``peftcli evaluate`` on sft data completes each prompt greedily and
scores the answers (exact match, token F1, classification by generation against a label list).

References: SQuAD's scores written out by hand, transformers' ``generate`` and PEFT's
``generate`` for the same adapter (greedy), the chat template rendered by hand."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.evaluation import EvalOptions, evaluate
from peftcli.generation import exact_match, greedy_complete, normalize_answer, token_f1
from peftcli.tiny import VOCAB
from tests.helpers import assert_error

INDEX = {w: i for i, w in enumerate(VOCAB)}
EOS = INDEX["</s>"]
# Eight prompts, each answered by one of two words: learnt in a few dozen steps.
MAPPING = [{"prompt": f"w{10 + i} w{30 + i}", "completion": f"w{60 + i % 2}"} for i in range(8)]
TEMPLATE = (
    "{% for m in messages %}<s> {{ {'system': 'w0', 'user': 'w1', 'assistant': 'w2'}[m['role']] }} {{ m['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}<s> w2 {% endif %}"
)


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A LoRA run trained to answer MAPPING, the untrained adapter it started from, the data."""
    d = tmp_path_factory.mktemp("gen")
    data = _write(d / "map.jsonl", MAPPING)
    runner = CliRunner()
    for run in ("untrained", "run"):
        assert runner.invoke(cli, ["inject", "lora", tiny_llama, "-o", str(d / run), "--quiet"]).exit_code == 0
    result = runner.invoke(cli, ["train", str(d / "run"), "--data", data, "--epochs", "30", "--batch-size", "8", "--lr", "3e-2", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"dir": d, "data": data, "run": str(d / "run"), "untrained": str(d / "untrained")}


def test_squad_scores_by_hand():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert exact_match("The cat sat.", "cat  sat") == 1.0 and exact_match("cat", "cats") == 0.0
    assert token_f1("x b c", "b c d") == pytest.approx(2 / 3)  # P = R = 2/3
    assert token_f1("a b c", "b c d") == pytest.approx(0.8)  # "a" is an article: P = 1, R = 2/3
    assert token_f1("b b", "b") == pytest.approx(2 * 0.5 * 1 / 1.5)  # P = 1/2 (one b matches), R = 1
    assert token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0 and token_f1("x", "y") == 0.0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_loops_equal_transformers_generate(arch, tiny_llama, tiny_gpt2):
    model = load_base_model({"llama": tiny_llama, "gpt2": tiny_gpt2}[arch], "AutoModelForCausalLM").eval()
    prompts = [[10, 11, 12], [13, 14], [20, 21, 22, 23, 24]]  # left-padded in one batch
    cached = greedy_complete(model, prompts, 0, {EOS}, 6, 8, "cpu", cache=True)
    recomputed = greedy_complete(model, prompts, 0, {EOS}, 6, 8, "cpu", cache=False)
    reference = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                             max_new_tokens=6, pad_token_id=0, eos_token_id=EOS)[0, len(p):].tolist()
        reference.append(out[: out.index(EOS)] if EOS in out else out)
    assert cached == recomputed == reference


def test_trained_run_answers_and_peft_generates_the_same(trained, tiny_llama):
    after = evaluate(trained["run"], EvalOptions(data=trained["data"], max_new_tokens=3))
    before = evaluate(trained["untrained"], EvalOptions(data=trained["data"], max_new_tokens=3))
    assert after["generation"]["exact_match"] >= 0.75 > before["generation"]["exact_match"]
    assert after["generation"]["cache"] is True and after["generation"]["examples"] == len(MAPPING)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), trained["run"]).eval()
    ours = load_adapted(tiny_llama, trained["run"], "AutoModelForCausalLM").eval()
    prompts = [[INDEX[w] for w in row["prompt"].split()] for row in MAPPING]
    theirs = []
    for p in prompts:
        out = peft_model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                                  max_new_tokens=3, pad_token_id=0, eos_token_id=EOS)[0, len(p):].tolist()
        theirs.append(out[: out.index(EOS)] if EOS in out else out)
    assert greedy_complete(ours, prompts, 0, {EOS}, 3, 4, "cpu", cache=True) == theirs


def test_prompt_tuning_decodes_without_a_cache_as_peft_does(tiny_llama, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["inject", "prompt", tiny_llama, "-o", str(tmp_path / "p"), "--virtual-tokens", "4", "--quiet"]).exit_code == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "p")).eval()
    ours = load_adapted(tiny_llama, str(tmp_path / "p"), "AutoModelForCausalLM").eval()
    assert ours.rewrites_inputs
    prompts = [[10, 11, 12], [13, 14, 15, 16]]
    # The reference is greedy decoding by hand over PEFT's forward, each step on the whole
    # sequence (PEFT's own generate keeps a cache, and with transformers 5 its tokens part
    # from its forward's after the second: it is not the reference for what the model says).
    theirs = []
    with torch.no_grad():
        for p in prompts:
            seq: list[int] = list(p)
            for _ in range(5):
                x = torch.tensor([seq])
                token = int(peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
                if token == EOS:
                    break
                seq.append(token)
            theirs.append(seq[len(p):])
    assert greedy_complete(ours, prompts, 0, {EOS}, 5, 4, "cpu", cache=False) == theirs


def test_label_accuracy_and_predictions_file(trained, tmp_path):
    out = tmp_path / "pred.jsonl"
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", trained["run"], "--data", trained["data"], "--max-new-tokens", "3", "--labels", "w60,w61",
                                 "--predictions", str(out), "--json"])
    assert result.exit_code == 0, result.output
    gen = json.loads(result.stdout)["generation"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, len(MAPPING) + 1))
    assert [r["reference"] for r in rows] == [m["completion"] for m in MAPPING]
    assert [r["prompt"] for r in rows] == [m["prompt"] for m in MAPPING]
    # Every number of the summary, recomputed from the records.
    assert gen["exact_match"] == pytest.approx(sum(r["prediction"] == r["reference"] for r in rows) / len(rows))
    assert gen["label_accuracy"] == pytest.approx(sum(r["label"] == r["reference"] for r in rows) / len(rows))
    assert gen["unmatched"] == sum(r["prediction"] not in ("w60", "w61") for r in rows)
    again = runner.invoke(cli, ["evaluate", trained["run"], "--data", trained["data"], "--predictions", str(out)])
    assert_error(again, 2, "--predictions", on_stdout=False)
    assert "--force" in again.stderr


def test_chat_prompt_is_the_conversation_before_the_last_answer(trained, tiny_llama, tmp_path):
    from peftcli.generation import prompts_of
    from peftcli.training.batching import load_tokenizer
    from peftcli.training.data import load_dataset

    conversation = [
        {"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"},
        {"role": "user", "content": "w12 w13"}, {"role": "assistant", "content": "w14 w15"},
    ]
    data = _write(tmp_path / "chat.jsonl", [{"messages": conversation}])
    [prompt] = prompts_of(load_dataset(data), load_tokenizer(tiny_llama), 128, TEMPLATE)
    words = "<s> w1 w10 </s> <s> w2 w11 </s> <s> w1 w12 w13 </s> <s> w2".split()
    assert prompt.ids == [INDEX[w] for w in words] and prompt.reference == "w14 w15" and not prompt.truncated
    [cut] = prompts_of(load_dataset(data), load_tokenizer(tiny_llama), 4, TEMPLATE)
    assert cut.ids == [INDEX[w] for w in words[-4:]] and cut.truncated
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    doc = evaluate(trained["run"], EvalOptions(data=data, chat_template=str(template), max_new_tokens=2, max_length=4))
    assert doc["generation"]["examples"] == 1 and doc["generation"]["truncated_prompts"] == 1


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--labels", "w60"], 2, "at least two labels"),
        (["--labels", "w60,W60."], 2, "the same answer once normalised"),
        (["--labels", "w60,The"], 2, "'The' is empty once normalised"),
        (["--labels", "w60,w62"], 1, "is none of --labels"),  # the data's fault: a bad-input exit
        (["--max-new-tokens", "-1"], 2, "--max-new-tokens"),
    ],
)
def test_bad_generation_options_are_one_line_errors(trained, args, code, message):
    result = CliRunner().invoke(cli, ["evaluate", trained["run"], "--data", trained["data"], *args])
    assert_error(result, code, message)


def test_a_run_whose_recorded_chat_template_is_gone_is_refused(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    args = json.loads((run / "train_args.json").read_text())
    (run / "train_args.json").write_text(json.dumps({**args, "chat_template": str(tmp_path / "gone.jinja")}))
    data = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"}]}])
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(cli, ["evaluate", str(run), "--data", data, "--predictions", str(out)])
    assert_error(result, 2, "was trained with the chat template", str(out))
    assert "--chat-template" in result.stderr


def test_labels_on_classification_data_is_refused(tiny_bert, tmp_path):
    data = _write(tmp_path / "cls.jsonl", [{"text": "w1", "label": "x"}, {"text": "w2", "label": "y"}])
    result = CliRunner().invoke(cli, ["evaluate", tiny_bert, "--data", data, "--labels", "x,y"])
    assert_error(result, 2, "--labels applies to sft data")
