"""Merging LoRA adapters into one adapter: peftcli ``merge --to-adapter`` against PEFT's
``add_weighted_adapter`` (benchmarks/README.md, "Adapter-space merges: peftcli vs PEFT").

A small random Llama (hidden 256, 2 layers) and PEFT LoRAs on q_proj and v_proj with random
A and B (``init_lora_weights=False``): two of ranks 8 and 16, and a second rank 16. Per
combination the script prints the relative error ‖ΔW_merged − Σ λᵢ ΔWᵢ‖ / ‖Σ λᵢ ΔWᵢ‖ over all
targeted weights (the norms summed over them), in fp64 from each result's own ΔW, and the
Eckart–Young optimum at the same rank (the fp64 SVD's discarded share).

    python benchmarks/adapter_merge_vs_peft.py
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

WEIGHTS = [1.0, 0.5]


def _model(root: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=1000, max_position_embeddings=128,
    )
    path = os.path.join(root, "base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _lora(base: str, root: str, name: str, rank: int, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = os.path.join(root, name)
    peft_model.save_pretrained(path)
    return path


def _deltas(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {
        name: module.get_delta_weight(adapter).detach().double()
        for name, module in peft_model.named_modules() if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def _loaded(base: str, adapters: dict):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    return model


def _error(got: dict, reference: dict) -> float:
    num = sum(float(torch.linalg.norm(got[n] - reference[n]) ** 2) for n in reference)
    den = sum(float(torch.linalg.norm(reference[n]) ** 2) for n in reference)
    return (num / den) ** 0.5


def _optimal(reference: dict, rank: int) -> float:
    s2 = [torch.linalg.svdvals(w) ** 2 for w in reference.values()]
    return (sum(float(s[rank:].sum()) for s in s2) / sum(float(s.sum()) for s in s2)) ** 0.5


def _peftcli(base: str, inputs: list[str], out: str, **chosen) -> dict:
    """peftcli's merged adapter, read back as PEFT loads it (module name -> ΔW)."""
    import peftcli

    peftcli.merge(base, inputs, out, peftcli.MergeOptions(weights=WEIGHTS, to_adapter=True, **chosen))
    return _deltas(_loaded(base, {"m": out}), "m")


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        base = _model(root)
        a8, b16, c16 = _lora(base, root, "a8", 8, 1), _lora(base, root, "b16", 16, 2), _lora(base, root, "c16", 16, 3)
        model = _loaded(base, {"a": a8, "b": b16})
        da, db = _deltas(model, "a"), _deltas(model, "b")
        reference = {n: WEIGHTS[0] * da[n] + WEIGHTS[1] * db[n] for n in da}
        rows = []
        for combination in ("linear", "ties", "dare_linear"):
            try:
                model.add_weighted_adapter(["a", "b"], WEIGHTS, combination, combination_type=combination, density=0.5)
                rows.append((f"PEFT {combination}, ranks 8 + 16", "-", "accepted", "-"))
            except ValueError as e:
                rows.append((f"PEFT {combination}, ranks 8 + 16", "-", f"ValueError: {str(e)[:48]}…", "-"))
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "cat", combination_type="cat")
        rows.append(("PEFT cat, ranks 8 + 16", "24", f"{_error(_deltas(model, 'cat'), reference):.2e}", "0"))
        for r in (4, 8, 16, 24):
            model.add_weighted_adapter(["a", "b"], WEIGHTS, f"svd{r}", combination_type="svd", svd_rank=r)
            rows.append(("PEFT svd, ranks 8 + 16", str(r), f"{_error(_deltas(model, f'svd{r}'), reference):.6f}", f"{_optimal(reference, r):.6f}"))
            ours = _peftcli(base, [a8, b16], os.path.join(root, f"ours{r}"), rank=r)
            rows.append(("peftcli --to-adapter, ranks 8 + 16", str(r), f"{_error(ours, reference):.6f}", f"{_optimal(reference, r):.6f}"))
        ours = _peftcli(base, [a8, b16], os.path.join(root, "full"), energy=1.0)
        rows.append(("peftcli --to-adapter --energy 1, ranks 8 + 16", "24", f"{_error(ours, reference):.2e}", "0"))
        equal = _loaded(base, {"b": b16, "c": c16})
        db, dc = _deltas(equal, "b"), _deltas(equal, "c")
        reference = {n: WEIGHTS[0] * db[n] + WEIGHTS[1] * dc[n] for n in db}
        equal.add_weighted_adapter(["b", "c"], WEIGHTS, "lin", combination_type="linear")
        rows.append(("PEFT linear, ranks 16 + 16", "16", f"{_error(_deltas(equal, 'lin'), reference):.4f}", "-"))  # not a truncation
        ours = _peftcli(base, [b16, c16], os.path.join(root, "eq"), energy=1.0)
        rows.append(("peftcli --to-adapter --energy 1, ranks 16 + 16", "32", f"{_error(ours, reference):.2e}", "0"))
    print("| combination | rank | relative error vs Σ λᵢ ΔWᵢ | Eckart–Young optimum |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.perf_counter() - start:.1f} s; torch {torch.__version__}, peft {__import__('peft').__version__}")


if __name__ == "__main__":
    main()
