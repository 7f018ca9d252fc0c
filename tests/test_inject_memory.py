"""inject streams φ: each tensor is made, written and freed in turn, with the bytes of the eager path.

The goldens below are digests of ``adapter_model.safetensors`` written by the implementation
before streaming (every φ tensor made by ``init``, then written), on the tiny fixtures, for the
cases whose values depend on shapes and seeds only (not on the base's weights). Digest: the
header without ``peftcli.base``/``peftcli.version`` metadata, in file order, plus the data.
If the tiny models' shapes change on purpose, regenerate them from a checkout before streaming.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from peftcli.methods import METHODS
from peftcli.methods.base import LazyTensor, SeededDraws, lazy_ones, lazy_zeros, materialize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOLDEN = {  # "arch: inject arguments" -> digest, from the eager implementation (torch 2.x CPU generator)
    # trainable tokens: copies of the tiny bases' rows (seeded weights); tied: the lm_head key too, as PEFT saves it.
    "llama: trainable-tokens --token-indices 1,3": "5d2c7f8a5b3c0599aed4e49b9dbac38f3ad233b6eefd7794b8f204395cf62c68",
    "llama-tied: trainable-tokens --token-indices 0,5,7": "25c9733a26a6b9c9ccc83ce9abbbf97824d421d708bd6fbd1064ea88d118513b",
    "llama: lora": "f86e6fbb2f97fcef945ac05a402adcf8d001048928764315c16908488be95664",
    "llama: lora --rank 4 --targets all-linear --seed 3": "d1203d01e70c75d25bcf573399217e0dac523e864fc748c7ca6135d8554a43ce",
    "bert: lora --rank 2 --rslora": "9072c0221105ed33e361541dbf271b09956ea4378d6eaaff97fb3a1df03549f6",
    "llama: adapter --style houlsby --seed 2": "90a4f2f655d629cb59b8d4750d1721db99f7593335047df3342d9406a6a30342",
    "gpt2: adapter --style parallel": "4fcdc6df69cf03a56907df3b367fed161bdea6ccd86a92ba43fea51b6cc17dcf",
    "bert: adapter --bottleneck 3": "e6f5e35a9c3866202d28b429bbe61ceb272c2f14aac9db27a027e8bf5065ac0a",
    "llama: ia3": "6ce5ab5fbc1fea0c15a01c564a846c77a79c4d1d1edb75090d32426c422edb26",
    "bert: ia3": "0abc3cb63cbb43c573459ac2014d0e2cb2f1b7eb8c9e22fe2c329999a945afcc",
    "gpt2: ia3 --targets all-linear": "2984b304a9db0db20a06fa1c35b85ae0524e73160d12a65cd91e181c510a20e9",
    "bert: bitfit": "6b0ff3a29b7c964e0c37de93b91ba7c7e735fec64180df3487d958fd6837fa45",
    "gpt2: bitfit --biases query,mlp-out": "f0d7f6cc6533a7ce29c4017f6ab0ceacec66bf0fbf1c18a8d5526b8c46756427",
    "llama: layers --layers 0-1": "d15e444b2cc6654822ca7f43bdcb3ce675c7d58ddbb14e592aa0eb131f95961e",
    "bert: layers --layers 1 --modules mlp": "6b154b6b8fddf62d1971c1cf2994aa2e06c330ae48bd113eb02529e4050849cc",
    "gpt2: layers --layers 0 --modules attn": "033e4a8d6f3f0874baa452e8bde22e3da312970e3b120e8237f2cb8e9dba7edb",
    "llama-tied: layers --layers 1": "503463ce56ed3cebf717b93fdc05c936f7bdac4988f4e716682fccd75e97d598",
    "llama: prefix --seed 1": "6bc980d8f5e8a81dc3f23535582f4d949a1439163c236c84e45a0357bddddbff",
    "gpt2: prefix --projection 8 --virtual-tokens 3": "ab36cf39efb440f5ed527b6f1884840e5f01e8e1625062680a1f9b16b1058914",
    "llama: prompt --init random --seed 7": "063900b602ef18dca8a1c4613102abc3d62db509c61a0d93015121d4ee2ca4bf",
    "llama: loha": "47cee08ad81f2aaa49567b284e326cb94b97ab16cf1a5a8d152649ca24aac96b",
    "bert: loha --rank 2 --alpha 4 --targets all-linear --seed 1": "ab48cbd0b4c8e262050a46006e78aba8ecfc9f41744619caf297234401c3331a",
    "llama: lokr": "70ce12537a246f29c9d4353e7b691a3b7fcdf84bf974785f2fad63244e2db016",
    "llama: lokr --rank 1 --decompose-both --targets all-linear --seed 2": "b3c38dce6c799425a785091f70d15c0e5d5fdcb88bb17685353946d5b7eb397c",
    "bert: lokr --rank 2 --decompose-factor 4": "a844be24df9d38e23526747cde17a43ecb754b9ce0dc588fea91f4d6051d4730",
    # VeRA: projections are PEFT's draws for projection_prng_key 0 (--seed does not change them, as in PEFT).
    "llama: vera": "c304b80e664da5bd3bac5ad4cd6ffb77f62c44e36dda9a6448b9839f8422d791",
    "gpt2: vera --rank 8 --targets all-linear --d-initial 0.05 --seed 3": "5abe70e0debc79b0cc81b4bf561beec42f401ca6e5f604652262433d8345b741",
    "llama: oft": "a7c5ec7200d42bd35abd5658cb3fd83488d10229ee05abadf41062ea8f41811d",
    "bert: oft --block-size 16 --targets all-linear --exact-cayley": "247cf699f3fc1f48c7fbdb85fc753e57d501e6503c4159a338e79d20217959a0",
    # BOFT: boft_R = 0 and boft_s = 1, shaped [factors, blocks, b, b] and [out, 1] as PEFT's.
    "llama: boft": "194892af6d2363e5bf1d4744869eb8beed45d3d59bc0e355813c010af997d478",
    "bert: boft --blocks 8 --butterfly-factor 2 --targets all-linear --dropout 0.1": "c7c9efa24690cf3333b46e51f6a61538c826bac43299cd4d97c9759b47061652",
    "llama: hra": "718ff4b65bc5e841773779961f61fd3f4365cf9ce7d768ec73a59f27ebc39b1d",
    "bert: hra --rank 4 --targets all-linear --seed 7": "6786b1b3a0df559e27c39a8ef24eb21c6a1e2adaef2d82e8cdb4338e844e3bab",
}

# Every method, including those whose φ depends on the base's weights (DoRA, prompt from rows).
EVERY_METHOD = [
    *GOLDEN,
    "llama: lora --targets all-linear --init gaussian --dora --seed 5",
    "gpt2: lora --targets all-linear --dora",
    "bert: prompt",
    "gpt2: prompt --init-text 'w1 w2 w3'",
    "llama: diff-pruning --density 0.1",
    "bert: lt-sft --density 0.1",
    "gpt2: lottery",
]


def _digest(path: str) -> str:
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = {k: v for k, v in header.pop("__metadata__", {}).items() if k not in ("peftcli.base", "peftcli.version")}
    return hashlib.sha256(json.dumps([meta, header]).encode() + raw[8 + n :]).hexdigest()


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_llama_tied, tiny_bert, tiny_gpt2) -> dict[str, str]:
    return {"llama": tiny_llama, "llama-tied": tiny_llama_tied, "bert": tiny_bert, "gpt2": tiny_gpt2}


def _inject(models, case: str, out: str) -> str:
    arch, args = case.split(": ", 1)
    result = CliRunner().invoke(cli, ["inject", *shlex.split(args), models[arch], "-o", out, "--quiet"])
    assert result.exit_code == 0, result.output
    return os.path.join(out, "adapter_model.safetensors")


@pytest.mark.parametrize("case", list(GOLDEN))
def test_streamed_phi_has_the_bytes_of_the_eager_implementation(models, tmp_path, case):
    assert _digest(_inject(models, case, str(tmp_path / "a"))) == GOLDEN[case]


@pytest.mark.parametrize("case", EVERY_METHOD)
def test_streamed_file_is_byte_identical_to_one_written_from_phi_made_whole_in_reverse(models, tmp_path, monkeypatch, case):
    streamed = open(_inject(models, case, str(tmp_path / "streamed")), "rb").read()
    method = METHODS[shlex.split(case.split(": ", 1)[1])[0]]
    real_init = type(method).init
    made_lazily = []

    def eager_init(self, ckpt, cfg, generator):
        tensors = real_init(self, ckpt, cfg, generator)
        made_lazily.extend(isinstance(v, LazyTensor) for v in tensors.values())
        # Made whole before writing, last first: random draws made out of order must not change.
        made = {k: materialize(tensors[k]) for k in reversed(list(tensors))}
        return {k: made[k] for k in tensors}

    monkeypatch.setattr(type(method), "init", eager_init)
    eager_file = _inject(models, case, str(tmp_path / "eager"))
    # Same base path, seed and version: the whole file, metadata included, is the same.
    assert open(eager_file, "rb").read() == streamed
    if method.name in ("lora", "adapter", "layers"):
        assert made_lazily and all(made_lazily)


def test_dora_adds_the_row_norms_to_the_same_lazy_a_and_b(models, tmp_path):
    plain = load_file(_inject(models, "gpt2: lora --targets all-linear --seed 4", str(tmp_path / "p")))
    dora = load_file(_inject(models, "gpt2: lora --targets all-linear --dora --seed 4", str(tmp_path / "d")))
    base = load_file(os.path.join(models["gpt2"], "model.safetensors"))
    magnitudes = {k: v for k, v in dora.items() if k.endswith("lora_magnitude_vector")}
    assert {k: v for k, v in dora.items() if k not in magnitudes}.keys() == plain.keys()
    assert all(torch.equal(dora[k], plain[k]) for k in plain)  # DoRA draws no random numbers of its own
    assert len(magnitudes) == 8  # c_attn, c_proj, c_fc, mlp.c_proj of two blocks
    for key, m in magnitudes.items():
        module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
        w = base[module + ".weight"].T  # Conv1D stores [in, out]
        assert torch.allclose(m, w.norm(dim=1))


def test_seeded_draws_give_the_eager_values_in_any_order_and_only_when_made():
    shapes = [(3, 5), (2,), (4, 4), (1, 7)]
    g = torch.Generator().manual_seed(11)
    eager = [torch.empty(s).uniform_(-1, 1, generator=g) if i % 2 else torch.randn(s, generator=g) for i, s in enumerate(shapes)]
    g = torch.Generator().manual_seed(11)
    start = g.get_state()
    draws = SeededDraws(g)

    def fn(i, s):
        if i % 2:
            return lambda gen: torch.empty(s).uniform_(-1, 1, generator=gen)
        return lambda gen: torch.randn(s, generator=gen)

    lazy = [draws.draw(s, fn(i, s)) for i, s in enumerate(shapes)]
    assert torch.equal(g.get_state(), start)  # registering draws draws nothing
    assert [t.numel() for t in lazy] == [15, 2, 16, 7] and lazy[2].shape == torch.Size([4, 4])
    for i in (2, 0, 2, 3, 1, 3):  # later first, repeated, earlier after later
        assert torch.equal(lazy[i].make(), eager[i]), i


def test_lazy_constants_and_a_broken_promise():
    assert torch.equal(lazy_zeros(2, 3).make(), torch.zeros(2, 3)) and torch.equal(lazy_ones((4,)).make(), torch.ones(4))
    assert lazy_zeros((2, 3)).shape == (2, 3) and lazy_zeros(2, 3).dtype == torch.float32
    with pytest.raises(AssertionError, match="promised"):
        LazyTensor((2, 2), torch.float32, lambda: torch.zeros(2, 3)).make()


def test_a_lazy_tensor_that_breaks_its_shape_writes_nothing(tiny_llama, tmp_path, monkeypatch):
    from peftcli.injection import inject
    from peftcli.methods.layers import Layers, LayersConfig

    real_init = Layers.init

    def broken(self, ckpt, cfg, generator):
        tensors = real_init(self, ckpt, cfg, generator)
        last = list(tensors)[-1]
        shape = tensors[last].shape
        tensors[last] = LazyTensor(shape, torch.float32, lambda: torch.zeros(shape.numel() + 1))
        return tensors

    monkeypatch.setattr(Layers, "init", broken)
    with pytest.raises(AssertionError, match="promised"):
        inject(tiny_llama, "layers", LayersConfig(layers="1"), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_the_budget_check_counts_lazy_tensors(tiny_llama, tmp_path, monkeypatch):
    from peftcli.injection import inject
    from peftcli.methods.layers import Layers, LayersConfig

    real_init = Layers.init
    monkeypatch.setattr(Layers, "init", lambda self, *a: {**real_init(self, *a), "extra": lazy_zeros(3)})
    with pytest.raises(AssertionError, match="init created .* but the budget says"):
        inject(tiny_llama, "layers", LayersConfig(layers="0"), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


# -- peak memory on a checkpoint whose φ is many times its largest tensor -----------------------

HIDDEN = 4096  # every projection 4096 x 4096: 32 MiB in BF16 (a hole on disk), 64 MiB as fp32 φ
LAYERS = 2


def _sparse_checkpoint(path: str) -> int:
    """A Llama-shaped checkpoint whose data are holes; returns the bytes of the largest fp32 φ tensor."""
    from peftcli.checkpoint.writer import TensorSpec, build_header

    h = HIDDEN
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (256, h))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + f"self_attn.{n}.weight", "BF16", (h, h)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [TensorSpec(p + f"mlp.{n}.weight", "BF16", (h, h)) for n in ("gate_proj", "up_proj", "down_proj")]
        specs += [TensorSpec(p + f"{n}.weight", "BF16", (h,)) for n in ("input_layernorm", "post_attention_layernorm")]
    specs += [TensorSpec("model.norm.weight", "BF16", (h,)), TensorSpec("lm_head.weight", "BF16", (256, h))]
    os.makedirs(path)
    header = build_header(specs, {"format": "pt"})
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(s.nbytes for s in specs))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": h,
        "num_hidden_layers": LAYERS, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 256,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return 4 * h * h


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_inject_layers_holds_one_phi_tensor_at_a_time(tmp_path):
    base = str(tmp_path / "base")
    largest = _sparse_checkpoint(base)
    out = str(tmp_path / "out")
    # A fresh process: its high-water mark after the imports, then after inject.
    script = textwrap.dedent(
        f"""
        def hwm():
            return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
        import torch
        from peftcli.injection import inject
        from peftcli.methods.layers import LayersConfig
        before = hwm()
        inject({base!r}, "layers", LayersConfig(layers="0-{LAYERS - 1}"), {out!r})
        print(before, hwm())
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    before, after = map(int, proc.stdout.split())
    weights = os.path.join(out, "adapter_model.safetensors")
    written = os.path.getsize(weights)
    try:
        assert written >= 14 * largest  # 7 projections a layer, fp32
        assert after - before < 3 * largest, (before, after, written)  # the eager path held all of `written`
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            f.seek(8 + n + header["model.layers.1.mlp.down_proj.weight"]["data_offsets"][0])
            assert f.read(largest) == bytes(largest)  # Δθ = 0
        assert header["model.layers.1.mlp.down_proj.weight"]["dtype"] == "F32"
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # ~0.9 GB
