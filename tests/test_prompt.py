"""Prompt tuning: inject, attach, PEFT parity in both directions, initialisation, forward arguments."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.injection import inject
from peftcli.methods.prompting.prompt import PromptTuningConfig
from tests.helpers import batch, output_tensor, randomize_

peft = pytest.importorskip("peft")

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


@pytest.fixture(params=["llama", "bert", "gpt2"])
def base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _arch(path: str) -> str:
    return json.load(open(os.path.join(path, "config.json")))["model_type"]


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _peft_model(path: str, n: int, init: str = "RANDOM", text: str | None = None):
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from peft import get_peft_model

    cfg = PeftPromptTuningConfig(
        task_type=TASK[_arch(path)], num_virtual_tokens=n, prompt_tuning_init=init,
        prompt_tuning_init_text=text, tokenizer_name_or_path=path if text else None,
    )
    return get_peft_model(load_base_model(path), cfg).eval()


@pytest.mark.parametrize("init", ["vocab", "text", "random"])
def test_trained_adapter_loads_in_peft_with_identical_outputs(base, init, tmp_path):
    run = str(tmp_path / "run")
    cfg = PromptTuningConfig(virtual_tokens=5, init=init, init_text="w1 w2 w3" if init == "text" else None)
    budget = inject(base, "prompt", cfg, run, seed=3)
    adapted = load_adapted(base, run)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == budget.trainable == adapted.num_trainable == 5 * 64

    inputs = batch()
    base_out = output_tensor(_forward(load_base_model(base), inputs))
    randomize_(trainable)
    ours = output_tensor(_forward(adapted, inputs))
    assert ours.shape[1] == base_out.shape[1] + 5  # the virtual tokens have outputs too, as in PEFT
    assert not torch.allclose(ours[:, 5:], base_out, atol=1e-4)
    adapted.save(str(tmp_path / "trained"))

    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "trained")).eval()
    assert torch.allclose(ours, output_tensor(_forward(theirs, inputs)), atol=1e-5)


def test_adapter_written_by_peft_loads_in_peftcli(base, tmp_path):
    peft_model = _peft_model(base, 6)
    randomize_([p for p in peft_model.parameters() if p.requires_grad], scale=0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapted(base, str(tmp_path / "peft"))
    inputs = batch(1)
    assert torch.allclose(output_tensor(_forward(ours, inputs)), output_tensor(_forward(peft_model, inputs)), atol=1e-5)


def test_adapter_config_is_the_one_peft_writes(base, tmp_path):
    inject(base, "prompt", PromptTuningConfig(virtual_tokens=4, init_text="w5 w6"), str(tmp_path / "ours"))
    _peft_model(base, 4, "TEXT", "w5 w6").save_pretrained(str(tmp_path / "peft"))
    ours = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    theirs = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    theirs.pop("peft_version")
    assert ours.pop("inference_mode") is False and theirs.pop("inference_mode") is True  # PEFT saves for inference
    assert os.path.samefile(ours.pop("base_model_name_or_path"), theirs.pop("base_model_name_or_path"))
    assert os.path.samefile(ours.pop("tokenizer_name_or_path"), theirs.pop("tokenizer_name_or_path"))
    assert ours == theirs


@pytest.mark.parametrize("n", [7, 2])  # repeated, and cut
def test_text_init_is_the_embedding_rows_of_the_tokenized_text(tiny_llama, tmp_path, n):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    run = str(tmp_path / "run")
    inject(tiny_llama, "prompt", PromptTuningConfig(virtual_tokens=n, init_text="w1 w2 w3"), run)
    got = load_file(os.path.join(run, "adapter_model.safetensors"))["prompt_embeddings"]

    ids = AutoTokenizer.from_pretrained(tiny_llama)("w1 w2 w3")["input_ids"]
    assert len(ids) == 3
    wanted = [ids[i % 3] for i in range(n)]
    embedding = load_base_model(tiny_llama).get_input_embeddings().weight.detach()
    assert torch.equal(got, embedding[wanted])
    peft_init = _peft_model(tiny_llama, n, "TEXT", "w1 w2 w3").prompt_encoder["default"].embedding.weight
    assert torch.equal(got, peft_init.detach())


def test_vocab_init_takes_rows_of_the_embedding_and_follows_the_seed(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file

    def init(seed, name):
        inject(tiny_gpt2, "prompt", PromptTuningConfig(virtual_tokens=8), str(tmp_path / name), seed=seed)
        return load_file(str(tmp_path / name / "adapter_model.safetensors"))["prompt_embeddings"]

    a, again, other = init(0, "a"), init(0, "b"), init(1, "c")
    embedding = load_base_model(tiny_gpt2).get_input_embeddings().weight.detach()
    for row in a:
        assert (embedding == row).all(dim=1).any()  # each vector is some token's embedding
    assert torch.equal(a, again) and not torch.equal(a, other)


def test_random_init_is_standard_normal(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    inject(tiny_llama, "prompt", PromptTuningConfig(virtual_tokens=40, init="random"), str(tmp_path / "r"))
    t = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))["prompt_embeddings"]
    embedding = load_base_model(tiny_llama).get_input_embeddings().weight.detach()
    assert t.shape == (40, 64) and abs(t.mean()) < 0.1 and 0.9 < t.std() < 1.1
    assert not any((embedding == row).all(dim=1).any() for row in t)


def test_forward_arguments_match_peft(tiny_llama, tmp_path):
    """Labels get −100 for the virtual tokens (same loss as PEFT); default position ids and
    inputs_embeds give what input_ids alone give."""
    peft_model = _peft_model(tiny_llama, 5)
    randomize_([p for p in peft_model.parameters() if p.requires_grad], scale=0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapted(tiny_llama, str(tmp_path / "peft"))
    inputs = batch()
    labels = inputs["input_ids"].clone()
    loss = _forward(ours, {**inputs, "labels": labels}).loss
    assert torch.allclose(loss, _forward(peft_model, {**inputs, "labels": labels}).loss, atol=1e-6)

    plain = output_tensor(_forward(ours, inputs))
    positions = torch.arange(7).expand(2, 7)
    assert torch.allclose(output_tensor(_forward(ours, {**inputs, "position_ids": positions})), plain, atol=1e-6)
    embeds = load_base_model(tiny_llama).get_input_embeddings()(inputs["input_ids"])
    with_embeds = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    assert torch.allclose(output_tensor(_forward(ours, with_embeds)), plain, atol=1e-6)


def test_token_type_ids_put_the_prompt_in_the_first_segment(tiny_bert, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_bert, "prompt", PromptTuningConfig(virtual_tokens=3), run)
    ours = load_adapted(tiny_bert, run)
    prompt = ours.phi_parameters()["prompt_embeddings"].detach()
    inputs = batch()
    segments = torch.zeros_like(inputs["input_ids"])
    segments[:, 4:] = 1
    got = output_tensor(_forward(ours, {**inputs, "token_type_ids": segments}))

    bert = load_base_model(tiny_bert)  # reference: the prompt in front, by hand
    embeds = torch.cat((prompt.expand(2, -1, -1), bert.get_input_embeddings()(inputs["input_ids"])), dim=1)
    mask = torch.cat((torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]), dim=1)
    types = torch.cat((torch.zeros(2, 3, dtype=torch.long), segments), dim=1)
    want = output_tensor(_forward(bert, {"inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": types}))
    assert torch.allclose(got, want, atol=1e-6)
    # PEFT's feature-extraction forward drops token_type_ids; with all-zero segments that is the same thing.
    zeros = {**inputs, "token_type_ids": torch.zeros_like(segments)}
    ours.save(str(tmp_path / "t"))
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(tiny_bert), str(tmp_path / "t")).eval()
    assert torch.allclose(output_tensor(_forward(ours, zeros)), output_tensor(_forward(theirs, inputs)), atol=1e-5)


def test_inject_cli_text_init(tiny_llama, tmp_path):
    out = str(tmp_path / "prompt")
    args = ["inject", "prompt", "--virtual-tokens", "20", "--init", "text", "--init-text", "Classify the sentiment:"]
    result = CliRunner().invoke(cli, [*args, tiny_llama, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["budget"]["trainable_params"] == 20 * 64
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "Classify the sentiment:"
    assert config["task_type"] == "CAUSAL_LM" and config["num_virtual_tokens"] == 20


def test_inspect_budget_cli(tiny_bert):
    result = CliRunner().invoke(cli, ["inspect", tiny_bert, "--budget", "prompt", "--virtual-tokens", "10", "--json"])
    assert result.exit_code == 0, result.stderr
    budget = json.loads(result.stdout)["budget"]
    hidden = json.load(open(os.path.join(tiny_bert, "config.json")))["hidden_size"]
    assert budget["trainable_params"] == 10 * hidden
    assert [t["module"] for t in budget["targets"]] == ["embeddings.word_embeddings"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--virtual-tokens", "0"], "--virtual-tokens must be positive"),
        (["--virtual-tokens", "64"], "leaves no position for the input"),
        (["--init", "zeros"], "--init must be one of"),
        (["--init", "text"], "--init text needs --init-text"),
        (["--init", "vocab", "--init-text", "w1"], "--init-text only applies with --init text"),
        (["--layers", "1"], "--layers does not apply to prompt tuning: its soft tokens enter at the input embeddings"),
    ],
)
def test_inject_errors_write_nothing(tiny_bert, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "prompt", *args, tiny_bert, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_text_init_without_a_tokenizer_is_a_usage_error(tiny_llama, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_llama, name), bare / name)
    with pytest.raises(UsageError, match="needs the model's tokenizer"):
        inject(str(bare), "prompt", PromptTuningConfig(init_text="w1"), str(tmp_path / "out"))
    result = CliRunner().invoke(cli, ["inject", "prompt", "--init-text", "w1", str(bare), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "tokenizer" in result.stderr and not os.path.exists(tmp_path / "out")
    inject(str(bare), "prompt", PromptTuningConfig(), str(tmp_path / "vocab"))  # vocab init needs none


def test_mismatched_adapter_is_an_error_listing_what_failed(tiny_llama, tiny_bert, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "prompt", PromptTuningConfig(virtual_tokens=4), run)
    cfg_path = os.path.join(run, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "num_virtual_tokens": 6}, open(cfg_path, "w"))
    with pytest.raises(BadInputError, match=r"prompt_embeddings is \[4, 64\] but the config has 6 virtual tokens"):
        attach_adapter(load_base_model(tiny_llama), run)
    json.dump({**cfg, "task_type": "SEQ_2_SEQ_LM"}, open(cfg_path, "w"))
    with pytest.raises(BadInputError, match="task_type='SEQ_2_SEQ_LM'"):
        attach_adapter(load_base_model(tiny_bert), run)


def test_forward_with_a_cache_is_refused(tiny_llama, tmp_path):
    inject(tiny_llama, "prompt", PromptTuningConfig(virtual_tokens=2), str(tmp_path / "run"))
    ours = load_adapted(tiny_llama, str(tmp_path / "run"))
    from transformers import DynamicCache

    with pytest.raises(UsageError, match="incremental decoding"):
        ours(**batch(), past_key_values=DynamicCache())


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_classification_head_matches_peft_seq_cls(arch, tiny_bert, tiny_gpt2, tmp_path):
    """The adapter also serves a sequence-classification model: labels stay per sequence."""
    import transformers
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from peft import get_peft_model

    path = {"bert": tiny_bert, "gpt2": tiny_gpt2}[arch]

    def classifier():
        torch.manual_seed(0)  # the same fresh head for both
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()

    run = str(tmp_path / "run")
    inject(path, "prompt", PromptTuningConfig(virtual_tokens=4), run)
    ours = attach_adapter(classifier(), run)
    randomize_(ours.phi_parameters().values(), scale=0.5)
    theirs = get_peft_model(classifier(), PeftPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.phi_parameters()["prompt_embeddings"])
    inputs = {**batch(), "labels": torch.tensor([0, 2])}
    if arch == "gpt2":  # from embeddings a decoder classifies the last position: no right padding
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    got, want = _forward(ours, inputs), _forward(theirs, inputs)
    assert got.logits.shape == (2, 3)
    assert torch.allclose(got.logits, want.logits, atol=1e-5) and torch.allclose(got.loss, want.loss, atol=1e-6)


def test_layers_is_a_usage_error_pointing_to_prefix_tuning(tiny_llama, tmp_path):
    for command in (["inject", "prompt", "--layers", "0-1", tiny_llama, "-o", str(tmp_path / "out")],
                    ["inspect", tiny_llama, "--budget", "prompt", "--layers", "0-1"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "use prefix tuning: peftcli inject prefix --layers 0-1" in result.stderr
    assert os.listdir(tmp_path) == []


# -- initialisation reads only the rows it takes -------------------------------------------------

VOCAB, HIDDEN = 8192, 512  # a bf16 embedding of 8 MiB; a row is 1 KiB


def _rchar() -> int:
    """Bytes this process has read through any system call (the kernel's count: nothing hides from it)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.fixture(scope="module")
def wide_embedding(tiny_llama, tmp_path_factory):
    """A Llama-shaped checkpoint whose embedding is large next to the rows a prompt takes."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("wide")
    config = json.load(open(os.path.join(tiny_llama, "config.json")))
    config.update(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=None)
    json.dump(config, open(path / "config.json", "w"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_llama, name), path / name)
    g = torch.Generator().manual_seed(0)
    save_file({
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g),
    }, str(path / "model.safetensors"))
    return str(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
@pytest.mark.parametrize("init", ["vocab", "text"])
def test_init_reads_only_the_rows_it_takes(wide_embedding, init, tmp_path):
    from transformers import AutoTokenizer

    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.methods.prompting.prompt import PromptTuning

    n, row = 20, HIDDEN * 2
    cfg = PromptTuningConfig(virtual_tokens=n, init=init, init_text="w1 w2 w3 w1 w9" if init == "text" else None)
    tokenizer_files = sum(os.path.getsize(os.path.join(wide_embedding, f)) for f in ("tokenizer.json", "tokenizer_config.json"))

    def init_prompt() -> tuple[torch.Tensor, int]:
        with open_checkpoint(wide_embedding) as ckpt:
            before = _rchar()
            prompt = PromptTuning().init(ckpt, cfg, torch.Generator().manual_seed(4))["prompt_embeddings"]
            return prompt, _rchar() - before

    init_prompt()  # warm-up: what the first call imports (the tokenizer library) is read once
    prompt, read = init_prompt()

    # The reference, the old way: the whole embedding read, then indexed.
    if init == "vocab":
        ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(4)).tolist()
    else:
        ids = AutoTokenizer.from_pretrained(wide_embedding)("w1 w2 w3 w1 w9")["input_ids"]
        ids = (ids * n)[:n]
    with open_checkpoint(wide_embedding) as ckpt:
        full = ckpt.get("model.embed_tokens.weight")
    assert torch.equal(prompt, full[ids].to(torch.float32)) and prompt.dtype == torch.float32
    rows = len(set(ids)) * row
    overhead = 16 * 1024 + (3 * tokenizer_files if init == "text" else 0)  # config.json; the tokenizer's files
    assert rows <= read <= rows + overhead, (read, rows)
    assert read < VOCAB * row / 20  # the embedding itself is 8 MiB

    # inject as a whole (warm now): headers, config, the rows; never the matrix.
    before = _rchar()
    inject(wide_embedding, "prompt", cfg, str(tmp_path / "run"), seed=4)
    read = _rchar() - before
    assert read <= rows + overhead + 64 * 1024, read
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "run" / "adapter_model.safetensors"))["prompt_embeddings"], prompt)


def test_embedding_rows_match_indexing_the_whole_tensor(wide_embedding):
    """Runs of consecutive ids are read as one range; repeats, the first and the last row included."""
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.methods.prompting.prompt import embedding_rows

    ids = [5, 6, 7, 3, 5, VOCAB - 1, 0, 7, 6]
    with open_checkpoint(wide_embedding) as ckpt:
        got = embedding_rows(ckpt, "model.embed_tokens.weight", ids)
        full = ckpt.get("model.embed_tokens.weight")
    assert torch.equal(got, full[ids].float())


def test_embedding_rows_from_a_pickle_checkpoint(tmp_path):
    """A pickle is already in memory: the rows are indexed from it."""
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.methods.prompting.prompt import embedding_rows

    weight = torch.randn(50, 8, dtype=torch.float16)
    path = str(tmp_path / "model.bin")
    torch.save({"embed_tokens.weight": weight}, path)
    with open_checkpoint(path, allow_pickle=True) as ckpt:
        got = embedding_rows(ckpt, "embed_tokens.weight", [49, 0, 3, 3])
    assert torch.equal(got, weight[[49, 0, 3, 3]].float())
