"""Prefix tuning: inject, attach, PEFT parity in both directions (GQA included), the projection MLP."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from peftcli.methods import foldable_hint
from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.injection import inject
from peftcli.methods.prompting.prefix import PrefixTuningConfig
from tests.helpers import batch, output_tensor, randomize_

peft = pytest.importorskip("peft")
# PEFT 0.21 still hands the prefix over as past_key_values, which transformers 5 renamed to cache.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}
VARIANTS = {"plain": None, "projection": 8}


@pytest.fixture(params=["llama", "bert", "gpt2"])
def base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _config(path: str) -> dict:
    return json.load(open(os.path.join(path, "config.json")))


def _kv_dim_and_layers(path: str) -> tuple[int, int]:
    """From the Hugging Face config, independently of peftcli: key/value width per layer, layers."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return kv_heads * head_dim, c.num_hidden_layers


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _peft_model(path: str, n: int, projection: int | None):
    from peft import PrefixTuningConfig as PeftPrefixTuningConfig
    from peft import get_peft_model

    cfg = PeftPrefixTuningConfig(
        task_type=TASK[_config(path)["model_type"]], num_virtual_tokens=n,
        prefix_projection=projection is not None, encoder_hidden_size=projection,
    )
    return get_peft_model(load_base_model(path), cfg).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trained_adapter_loads_in_peft_with_identical_outputs(base, variant, tmp_path):
    run = str(tmp_path / "run")
    budget = inject(base, "prefix", PrefixTuningConfig(virtual_tokens=5, projection=VARIANTS[variant]), run, seed=3)
    adapted = load_adapted(base, run)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == budget.trainable == adapted.num_trainable

    inputs = batch()
    base_out = output_tensor(_forward(load_base_model(base), inputs))
    randomize_(trainable)
    ours = output_tensor(_forward(adapted, inputs))
    assert ours.shape == base_out.shape and not torch.allclose(ours, base_out, atol=1e-4)
    adapted.save(str(tmp_path / "trained"))

    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "trained")).eval()
    assert torch.allclose(ours, output_tensor(_forward(theirs, inputs)), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_written_by_peft_loads_in_peftcli(base, variant, tmp_path):
    peft_model = _peft_model(base, 6, VARIANTS[variant])
    randomize_([p for p in peft_model.parameters() if p.requires_grad], scale=0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))  # with projection: the MLP's output only
    ours = load_adapted(base, str(tmp_path / "peft"))
    inputs = batch(1)
    assert torch.allclose(output_tensor(_forward(ours, inputs)), output_tensor(_forward(peft_model, inputs)), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_config_and_budget_are_peft_s(base, variant, tmp_path):
    projection = VARIANTS[variant]
    budget = inject(base, "prefix", PrefixTuningConfig(virtual_tokens=4, projection=projection), str(tmp_path / "ours"))
    peft_model = _peft_model(base, 4, projection)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    theirs = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    theirs.pop("peft_version")
    assert ours.pop("inference_mode") is False and theirs.pop("inference_mode") is True  # PEFT saves for inference
    assert os.path.samefile(ours.pop("base_model_name_or_path"), theirs.pop("base_model_name_or_path"))
    assert ours == theirs

    kv_dim, layers = _kv_dim_and_layers(base)
    assert ours["token_dim"] == kv_dim  # GQA: the key/value width (32 on the tiny Llama), not the hidden size
    prefix = 4 * layers * 2 * kv_dim
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    # PEFT counts what trains: the prefix, or with a projection the MLP only. So do we.
    assert budget.trainable == peft_trainable
    if projection is None:
        assert peft_trainable == prefix


def test_projection_trains_the_mlp_and_saves_its_output(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=3, projection=16), run)
    adapted = load_adapted(tiny_llama, run)
    phi = adapted.phi_parameters()
    assert "prompt_embeddings" not in phi  # derived from the MLP: never trained directly
    assert adapted.num_trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    before = {k: p.detach().clone() for k, p in phi.items()}
    opt = torch.optim.Adam(phi.values(), lr=1e-2)
    adapted.train()
    output_tensor(adapted(**batch())).pow(2).mean().backward()
    opt.step()
    adapted.eval()
    changed = {k for k in phi if not torch.equal(before[k], phi[k])}
    assert changed == set(phi)

    trained = output_tensor(_forward(adapted, batch()))
    adapted.save(str(tmp_path / "trained"))
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(load_base_model(tiny_llama), str(tmp_path / "trained")).eval()
    assert torch.allclose(output_tensor(_forward(theirs, batch())), trained, atol=1e-5)
    again = load_adapted(tiny_llama, str(tmp_path / "trained"))
    assert again.num_trainable == adapted.num_trainable  # the MLP is back, training can resume
    assert torch.allclose(output_tensor(_forward(again, batch())), trained, atol=1e-6)


def test_forward_arguments_match_peft(tiny_llama, tiny_gpt2, tmp_path):
    """Labels are untouched (same loss as PEFT); position ids are shifted past the prefix, as PEFT."""
    for path in (tiny_llama, tiny_gpt2):
        peft_model = _peft_model(path, 4, None)
        randomize_([p for p in peft_model.parameters() if p.requires_grad], scale=0.5)
        out = str(tmp_path / os.path.basename(path))
        peft_model.save_pretrained(out)
        ours = load_adapted(path, out)
        inputs = batch()
        labels = {**inputs, "labels": inputs["input_ids"].clone()}
        assert torch.allclose(_forward(ours, labels).loss, _forward(peft_model, labels).loss, atol=1e-6)
        positions = {**inputs, "position_ids": torch.arange(7).expand(2, 7)}
        got = output_tensor(_forward(ours, positions))
        assert torch.allclose(got, output_tensor(_forward(peft_model, positions)), atol=1e-5)
        assert torch.allclose(got, output_tensor(_forward(ours, inputs)), atol=1e-5)  # what the default gives


def test_inject_cli_with_projection(tiny_llama, tmp_path):
    out = str(tmp_path / "prefix")
    args = ["inject", "prefix", "--virtual-tokens", "20", "--projection", "32", tiny_llama, "-o", out, "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    kv, layers = _kv_dim_and_layers(tiny_llama)
    out_dim = layers * 2 * kv
    mlp = 20 * kv + (kv * 32 + 32) + (32 * out_dim + out_dim)
    assert json.loads(result.stdout)["budget"]["trainable_params"] == mlp  # the prefix is the MLP's output
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["prefix_projection"] is True and config["encoder_hidden_size"] == 32


def test_inspect_budget_cli(tiny_llama):
    result = CliRunner().invoke(cli, ["inspect", tiny_llama, "--budget", "prefix", "--virtual-tokens", "10", "--json"])
    assert result.exit_code == 0, result.stderr
    budget = json.loads(result.stdout)["budget"]
    kv, layers = _kv_dim_and_layers(tiny_llama)
    assert budget["trainable_params"] == 10 * layers * 2 * kv
    assert [t["module"] for t in budget["targets"]] == [f"model.layers.{i}.self_attn" for i in range(layers)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--virtual-tokens", "-1"], "--virtual-tokens must be positive"),
        (["--virtual-tokens", "64"], "leaves no position for the input"),
        (["--projection", "0"], "--projection must be positive"),
        (["--layers", "2"], "--layers names layer 2, which this model does not have (layers here: 0-1)"),
        (["--layers", "1-0"], "invalid --layers range"),
    ],
)
def test_inject_errors_write_nothing(tiny_gpt2, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "prefix", *args, tiny_gpt2, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_mismatched_adapter_is_an_error_listing_what_failed(tiny_llama, tiny_gpt2, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=4), run)
    with pytest.raises(BadInputError, match=r"2 problem\(s\).*token_dim.*prompt_embeddings is \[4, 128\], not \[4, 256\]"):
        attach_adapter(load_base_model(tiny_gpt2), run)


def test_inconsistent_projection_adapters_are_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=4, projection=8), run)
    weights = os.path.join(run, "adapter_model.safetensors")
    tensors = load_file(weights)
    save_file({**tensors, "prompt_embeddings": tensors["prompt_embeddings"] + 1}, weights)
    with pytest.raises(BadInputError, match="not the output of the prefix_encoder MLP"):
        attach_adapter(load_base_model(tiny_llama), run)
    save_file(tensors, weights)
    cfg_path = os.path.join(run, "adapter_config.json")
    json.dump({**json.load(open(cfg_path)), "prefix_projection": False}, open(cfg_path, "w"))
    with pytest.raises(BadInputError, match="its config has no prefix_projection"):
        attach_adapter(load_base_model(tiny_llama), run)


def test_forward_with_a_cache_is_refused(tiny_gpt2, tmp_path):
    inject(tiny_gpt2, "prefix", PrefixTuningConfig(virtual_tokens=2), str(tmp_path / "run"))
    ours = load_adapted(tiny_gpt2, str(tmp_path / "run"))
    from transformers import DynamicCache

    with pytest.raises(UsageError, match="incremental decoding"):
        ours(**batch(), cache=DynamicCache())


@pytest.mark.parametrize("layers", [None, "1"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_classification_head_sees_the_prefix(arch, layers, tiny_bert, tiny_llama, tmp_path):
    """PEFT 0.21 refuses prefix tuning under a classification head on transformers 5; we pass the
    cache to the backbone (BERT's head forward takes none: through a hook). Reference: the same
    adapter on the bare backbone (PEFT-checked above), then the head by hand."""
    import transformers

    path = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    run = str(tmp_path / "run")
    inject(path, "prefix", PrefixTuningConfig(virtual_tokens=4, layers=layers), run, seed=2)
    torch.manual_seed(0)
    head_model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    ours = attach_adapter(head_model, run)
    backbone = attach_adapter(transformers.AutoModel.from_pretrained(path).eval(), run)
    inputs = batch()
    got = _forward(ours, inputs).logits
    hidden = _forward(backbone, inputs)
    with torch.no_grad():
        if arch == "bert":
            want = head_model.classifier(hidden.pooler_output)
        else:  # the last position holds no padding here (left padding)
            want = head_model.score(hidden.last_hidden_state[:, -1])
    assert torch.allclose(got, want, atol=1e-5)
    plain = _forward(head_model, inputs).logits  # outside the adapted forward the hook adds nothing
    assert not torch.allclose(plain, got, atol=1e-4)


# -- --layers: a prefix in some layers only (peftcli's own layout) ------------------------------

ATTENTION_CLASSES = ("LlamaAttention", "BertSelfAttention", "GPT2Attention")


def _attention_by_layer(model) -> list:
    """Each layer's attention module, in order, found by transformers' class names (not by peftcli)."""
    return [m for _, m in model.named_modules() if type(m).__name__ in ATTENTION_CLASSES]


def _record_attention(model, inputs) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (the hidden states its attention got, its attention output) in one forward."""
    seen = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: seen.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None), out[0])),
            with_kwargs=True,
        )
        for i, m in enumerate(_attention_by_layer(model))
    ]
    try:
        _forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _attention_on(model, layer: int, hidden: torch.Tensor, inputs) -> torch.Tensor:
    """Layer ``layer``'s attention output in ``model``'s own forward of ``inputs`` when its
    attention gets ``hidden`` instead of what the layers below it computed."""
    module = _attention_by_layer(model)[layer]
    got = []

    def swap(mod, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    hooks = (
        module.register_forward_pre_hook(swap, with_kwargs=True),
        module.register_forward_hook(lambda mod, args, kwargs, out: got.append(out[0]), with_kwargs=True),
    )
    try:
        _forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return got[0]


def _unpadded() -> dict:
    inputs = batch()
    return {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}


def _load(path: str, eager: bool):
    if not eager:
        return load_base_model(path)
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("layers", ["0", "1"])
@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_layers_only_the_chosen_layers_attention_sees_the_prefix(base, layers, eager, tmp_path):
    """Each layer's attention, fed the hidden states it got in the adapted forward: in a chosen
    layer it equals the full-prefix (PEFT-layout) model's attention with the same keys and values
    there; in the others it equals the base model's attention (no prefix), at the positions the
    prefix shifts the input to (n…n+L−1, where the base is told so explicitly)."""
    if eager and _config(base)["model_type"] == "bert":
        pytest.skip("AutoModelForCausalLM is for the decoders")
    n, chosen = 3, [int(layers)]
    kv, num_layers = _kv_dim_and_layers(base)
    ours_run, full_run = str(tmp_path / "ours"), str(tmp_path / "full")
    inject(base, "prefix", PrefixTuningConfig(virtual_tokens=n, layers=layers), ours_run, seed=1)
    inject(base, "prefix", PrefixTuningConfig(virtual_tokens=n), full_run, seed=2)
    ours = attach_adapter(_load(base, eager), ours_run)
    full = attach_adapter(_load(base, eager), full_run)
    randomize_(ours.phi_parameters().values(), scale=1.0)
    phi = ours.phi_parameters()["prompt_embeddings"].detach()
    assert phi.shape == (n, len(chosen) * 2 * kv)
    with torch.no_grad():  # the full prefix's columns for the chosen layer are ours
        full.phi_parameters()["prompt_embeddings"][:, chosen[0] * 2 * kv : (chosen[0] + 1) * 2 * kv] = phi
    plain = _load(base, eager)
    for inputs in (batch(), _unpadded()):  # with padding, and without (BERT's mask may be None then)
        length = inputs["input_ids"].shape[1]
        shifted = {**inputs, "position_ids": torch.arange(n, n + length).expand(inputs["input_ids"].shape[0], -1)}
        seen = _record_attention(ours, inputs)
        assert sorted(seen) == list(range(num_layers))
        for layer, (hidden, out) in seen.items():
            base_attention = _attention_on(plain, layer, hidden, shifted)
            if layer in chosen:
                assert torch.allclose(out, _attention_on(full, layer, hidden, inputs), atol=1e-5)
                assert not torch.allclose(out, base_attention, atol=1e-3)
            else:
                assert torch.allclose(out, base_attention, atol=1e-5)
        # Outside the adapted forward the hooks on the other layers change nothing.
        assert torch.allclose(output_tensor(_forward(ours.model, inputs)), output_tensor(_forward(plain, inputs)), atol=1e-6)


def test_layers_covering_every_layer_is_the_peft_layout_prefix(base, tmp_path):
    """Same seed, same tensor; attached, the --layers route (cache subclass, hooks) gives the
    outputs of PEFT's route, which the parity tests above check against PEFT itself."""
    from safetensors.torch import load_file

    _, num_layers = _kv_dim_and_layers(base)
    peft_run, ours_run = str(tmp_path / "peft"), str(tmp_path / "ours")
    inject(base, "prefix", PrefixTuningConfig(virtual_tokens=4), peft_run, seed=5)
    inject(base, "prefix", PrefixTuningConfig(virtual_tokens=4, layers=f"0-{num_layers - 1}"), ours_run, seed=5)
    key = "prompt_embeddings"
    assert torch.equal(load_file(f"{peft_run}/adapter_model.safetensors")[key], load_file(f"{ours_run}/adapter_model.safetensors")[key])
    assert json.load(open(f"{ours_run}/adapter_config.json"))["peft_type"] == "PEFTCLI"
    theirs, ours = load_adapted(base, peft_run), load_adapted(base, ours_run)
    randomize_(theirs.phi_parameters().values(), scale=0.5)
    with torch.no_grad():
        ours.phi_parameters()[key].copy_(theirs.phi_parameters()[key])
    for inputs in (batch(), _unpadded()):
        assert torch.allclose(output_tensor(_forward(ours, inputs)), output_tensor(_forward(theirs, inputs)), atol=1e-6)


@pytest.mark.parametrize("projection", [None, 8])
def test_layers_contract(base, projection, tmp_path):
    """inject --layers 1 → attach → counts equal the formula → one optimizer step changes only φ
    → save and reload reproduce the trained outputs; the config is peftcli's own."""
    kv, num_layers = _kv_dim_and_layers(base)
    n, run = 5, str(tmp_path / "run")
    budget = inject(base, "prefix", PrefixTuningConfig(virtual_tokens=n, projection=projection, layers="1"), run)
    width = 1 * 2 * kv  # one layer's key and value
    formula = n * width if projection is None else n * kv + (kv * 8 + 8) + (8 * width + width)
    adapted = load_adapted(base, run)
    trainable = {k: p for k, p in adapted.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == budget.trainable == adapted.num_trainable == formula
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    assert config["peft_type"] == "PEFTCLI"
    assert config["peftcli"] == {"method": "prefix", "virtual_tokens": n, "projection": projection, "layers": "1"}

    inputs = batch()
    before = {k: t.detach().clone() for k, t in adapted.state_dict().items()}
    adapted.train()
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    output_tensor(adapted(**inputs)).float().pow(2).mean().backward()
    opt.step()
    adapted.eval()
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(trainable), sorted(changed - set(trainable))[:3]
    if projection is None:
        assert changed == set(trainable)
    trained = output_tensor(_forward(adapted, inputs))
    adapted.save(str(tmp_path / "trained"))
    again = load_adapted(base, str(tmp_path / "trained"))
    assert again.num_trainable == formula
    assert torch.allclose(output_tensor(_forward(again, inputs)), trained, atol=1e-6)


def test_layers_budget_and_inject_report_the_same(tiny_llama, tmp_path):
    kv, layers = _kv_dim_and_layers(tiny_llama)
    args = ["--budget", "prefix", "--virtual-tokens", "6", "--layers", "1"]
    shown = CliRunner().invoke(cli, ["inspect", tiny_llama, *args, "--json"])
    assert shown.exit_code == 0, shown.stderr
    out = str(tmp_path / "run")
    made = CliRunner().invoke(cli, ["inject", "prefix", "--virtual-tokens", "6", "--layers", "1", tiny_llama, "-o", out, "--json"])
    assert made.exit_code == 0, made.stderr
    budget, injected = json.loads(shown.stdout)["budget"], json.loads(made.stdout)["budget"]
    assert budget["trainable_params"] == injected["trainable_params"] == 6 * 2 * kv
    assert [t["module"] for t in budget["targets"]] == [t["module"] for t in injected["targets"]] == ["model.layers.1.self_attn"]


@pytest.mark.parametrize("layers", [None, "1"])
def test_merge_refuses_and_check_accepts_prefix_adapters_alike(tiny_gpt2, tmp_path, layers):
    run = str(tmp_path / "run")
    inject(tiny_gpt2, "prefix", PrefixTuningConfig(virtual_tokens=2, layers=layers), run)
    out = str(tmp_path / "merged")
    merged = CliRunner().invoke(cli, ["merge", tiny_gpt2, run, "-o", out])
    assert merged.exit_code == 2 and not os.path.exists(out)
    assert merged.stderr.strip().splitlines() == [
        f"error: {run}: prefix adds computation (new modules or inputs) that no weight change reproduces "
        f"({foldable_hint()})"
    ]
    checked = CliRunner().invoke(cli, ["check", tiny_gpt2, run])
    assert checked.exit_code == 0, checked.output
    assert f"{run}: ok (adapter: prefix, 1 tensor)" in checked.stdout
    assert f"merge would refuse: {run}: prefix adds computation that no weight change reproduces" in checked.output


def test_layers_adapter_that_does_not_fit_is_refused(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=3, layers="1"), run)
    cfg_path = os.path.join(run, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "peftcli": {**cfg["peftcli"], "layers": "0-1"}}, open(cfg_path, "w"))
    with pytest.raises(BadInputError, match=r"prompt_embeddings is \[3, 64\], not \[3, 128\] \(3 virtual tokens × 2 layers"):
        attach_adapter(load_base_model(tiny_llama), run)
    json.dump({**cfg, "peftcli": {**cfg["peftcli"], "layers": "7"}}, open(cfg_path, "w"))
    with pytest.raises(BadInputError, match="names layer 7, which this model does not have"):
        attach_adapter(load_base_model(tiny_llama), run)
    checked = CliRunner().invoke(cli, ["check", tiny_llama, run])
    assert checked.exit_code == 1 and "does not have" in checked.stdout


def test_layers_refuses_a_model_whose_attention_it_cannot_find(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=3, layers="1"), run)
    model = load_base_model(tiny_llama)
    del model.model.layers[0].self_attn.layer_idx
    with pytest.raises(BadInputError, match="no attention module with layer_idx 0"):
        attach_adapter(model, run)
    assert not hasattr(model, "peftcli_prefix")  # nothing attached


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_encoder_decoder_models_are_refused(tiny_bert, tmp_path, method):
    """T5/BART-like configs (is_encoder_decoder) would need virtual tokens on both sides: refused, for both methods."""
    import shutil

    base = tmp_path / "seq2seq"
    shutil.copytree(tiny_bert, base)
    config = json.load(open(base / "config.json"))
    json.dump({**config, "is_encoder_decoder": True}, open(base / "config.json", "w"))
    out = str(tmp_path / "out")
    for command in (["inject", method, str(base), "-o", out], ["inspect", str(base), "--budget", method]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            "error: prompt learning on encoder-decoder models is not supported yet "
            "(it needs virtual tokens for both the encoder and the decoder) (use lora, ia3 or adapter on this model)"
        ]
    assert not os.path.exists(out)
