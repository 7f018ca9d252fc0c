"""Merge arithmetic: linear, TIES, DARE and DARE-TIES against hand examples and references written here.

The references are deliberately different code: float64 numpy with a lexicographic sort for the trim,
plain Python loops over the entries of tiny tensors, and hand-computed 1-D examples in the manner of
the TIES paper's figure (trimming, conflicting signs, the disjoint mean).
"""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from peftcli.errors import BadInputError, UsageError
from peftcli.merging.arithmetic import METHODS, combine


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _small_ints(*shape, seed: int) -> torch.Tensor:
    """Entries in {-2, …, 2}: many equal magnitudes, zeros and zero sums; fp32 sums of them are exact."""
    return torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).float()


# ---------------------------------------------------------------- references


def _ref_k(density: float, n: int) -> int:
    """round(density × n), half up, on the decimal written, at least 1, at most n."""
    k = int(Fraction(repr(density)) * n + Fraction(1, 2))
    return min(n, max(1, k))


def _ref_trim(phi: np.ndarray, density: float) -> np.ndarray:
    flat = phi.ravel()
    n = flat.size
    order = np.lexsort((np.arange(n), -np.abs(flat)))  # by -|φ|, then by flat index
    out = np.zeros(n)
    chosen = order[: _ref_k(density, n)]
    out[chosen] = flat[chosen]
    return out.reshape(phi.shape)


def _ref_consensus(values: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    weighted = [w * v for v, w in zip(values, weights)]
    elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
    num = np.zeros_like(elected)
    den = np.zeros_like(elected)
    for x, w in zip(weighted, weights):
        agree = np.sign(x) == elected
        num += np.where(agree, x, 0.0)
        den += np.where(agree, w, 0.0)
    return num / np.where(den == 0, 1.0, den) if normalize else num


def _ref_ties(deltas, weights, density):
    trimmed = [_ref_trim(d.double().numpy(), density) for d in deltas]
    return _ref_consensus(trimmed, weights, normalize=True)


def _loop_ties(deltas, weights, density):
    """TIES entry by entry in plain Python, for tiny tensors."""
    n = deltas[0].numel()
    k = _ref_k(density, n)
    kept = []
    for d in deltas:
        flat = d.flatten().tolist()
        ranked = sorted(range(n), key=lambda j: (-abs(flat[j]), j))
        kept.append({j: flat[j] for j in ranked[:k]})
    out = []
    for j in range(n):
        votes = [w * t.get(j, 0.0) for t, w in zip(kept, weights)]
        sign = 1 if sum(votes) >= 0 else -1
        agreeing = [(v, w) for v, w in zip(votes, weights) if v * sign > 0]
        out.append(sum(v for v, _ in agreeing) / sum(w for _, w in agreeing) if agreeing else 0.0)
    return np.array(out).reshape(tuple(deltas[0].shape))


def _dare_alone(deltas, index, density, seed=0, key="t"):
    """Input ``index``'s DARE values φ̃_i, isolated by giving every other input weight 0 and φ = 0."""
    others = [torch.zeros_like(d) for d in deltas]
    others[index] = deltas[index]
    weights = [0.0] * len(deltas)
    weights[index] = 1.0
    return combine(others, weights, "dare", density=density, seed=seed, key=key)


def _close(actual: torch.Tensor, expected) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), torch.as_tensor(np.asarray(expected), dtype=torch.float64))


# ---------------------------------------------------------------- linear


def test_linear_is_the_weighted_sum():
    deltas = [_randn(7, 5, seed=s) for s in range(3)]
    weights = [0.5, -1.25, 2.0]
    expected = sum(w * d.double().numpy() for d, w in zip(deltas, weights))
    _close(combine(deltas, weights, "linear"), expected)


def test_linear_exact_on_integers_and_leaves_inputs_alone():
    deltas = [_small_ints(4, 6, seed=s) for s in range(3)]
    before = [d.clone() for d in deltas]
    out = combine(deltas, [1.0, 2.0, -0.5], "linear")
    assert torch.equal(out, deltas[0] + 2 * deltas[1] - 0.5 * deltas[2])
    assert all(torch.equal(d, b) for d, b in zip(deltas, before))
    assert all(out.data_ptr() != d.data_ptr() for d in deltas)


# ---------------------------------------------------------------- TIES


def test_ties_hand_example_trim_elect_disjoint_mean():
    # density 0.6 of 5 entries keeps 3 per input. Trimmed:
    #   φ1 → [ .5,  0, .9, -.4,  0]   φ2 → [-.3, .8, 0, -.6, 0]   φ3 → [.4, -.7, 0, 0, -.2]
    # summed [.6, .1, .9, -1, -.2] elects [+, +, +, -, -]; the agreeing inputs are
    # {1,3}, {2}, {1}, {1,2}, {3}: means [.45, .8, .9, -.5, -.2].
    deltas = [
        _t([0.5, -0.1, 0.9, -0.4, 0.0]),
        _t([-0.3, 0.8, 0.2, -0.6, 0.05]),
        _t([0.4, -0.7, -0.05, 0.1, -0.2]),
    ]
    _close(combine(deltas, [1.0, 1.0, 1.0], "ties", density=0.6), [0.45, 0.8, 0.9, -0.5, -0.2])
    # Weights (1, 2, 1) enter before the election and divide the agreeing sum:
    # entry 0: .5 - .6 + .4 > 0 → (.5 + .4) / (1 + 1); entry 3: (-.4 - 1.2) / (1 + 2).
    _close(combine(deltas, [1.0, 2.0, 1.0], "ties", density=0.6), [0.45, 0.8, 0.9, -1.6 / 3, -0.2])
    # Plain task arithmetic on the same inputs, for contrast: conflicts cancel.
    _close(combine(deltas, [1.0, 1.0, 1.0], "linear"), [0.6, 0.0, 1.05, -0.9, -0.15])


def test_ties_zero_sum_elects_plus_and_no_agreement_gives_zero():
    deltas = [_t([1.0, 0.0, 3.0]), _t([-1.0, 0.0, -1.0])]
    # entry 0: 1 - 1 = 0 elects +, only φ1 agrees; entry 1: nobody is non-zero; entry 2: + wins.
    _close(combine(deltas, [1.0, 1.0], "ties", density=1.0), [1.0, 0.0, 3.0])


def test_ties_equal_magnitudes_keep_the_lower_flat_index():
    phi = _t([[1.0, -1.0], [1.0, 0.5], [-1.0, 2.0]])
    # density 0.5 of 6 keeps 3: the 2, then the first two of the four 1s (flat indices 0 and 1).
    _close(combine([phi], [1.0], "ties", density=0.5), [[1.0, -1.0], [0.0, 0.0], [0.0, 2.0]])


@pytest.mark.parametrize(
    ("density", "n", "kept"), [(0.5, 5, 3), (0.25, 6, 2), (0.29, 50, 15), (0.01, 5, 1), (1.0, 9, 9)]
)
def test_ties_keep_count_rounds_half_up_on_the_decimal(density, n, kept):
    # 0.29 × 50 is 14.499… in binary floating point but 14.5 as written: half up gives 15.
    phi = torch.arange(1, n + 1, dtype=torch.float32)  # distinct non-zero magnitudes
    out = combine([phi], [1.0], "ties", density=density)
    assert int(torch.count_nonzero(out)) == kept == _ref_k(density, n)
    assert torch.equal(out[n - kept :], phi[n - kept :])  # the largest ones


def test_ties_one_input_density_one_is_the_input():
    # mergekit's normalised TIES divides by the agreeing weight, so the weight cancels.
    phi = _randn(6, 4, seed=3)
    _close(combine([phi], [0.7], "ties", density=1.0), phi.double().numpy())


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
def test_ties_matches_numpy_reference(density):
    deltas = [_randn(16, 24, seed=s) for s in range(4)]
    weights = [1.0, 0.3, 2.0, 0.0]
    _close(combine(deltas, weights, "ties", density=density), _ref_ties(deltas, weights, density))


@pytest.mark.parametrize("seed", range(6))
def test_ties_matches_entry_loop_on_tied_small_integers(seed):
    deltas = [_small_ints(3, 5, seed=10 * seed + i) for i in range(3)]
    weights = [1.0, 0.5, 2.0]
    out = combine(deltas, weights, "ties", density=0.3)
    _close(out, _loop_ties(deltas, weights, 0.3))
    _close(out, _ref_ties(deltas, weights, 0.3))


# ---------------------------------------------------------------- DARE


def test_dare_seed_is_the_documented_hash():
    phi = _randn(50, 40, seed=4) + 10.0  # no zeros: a zero output means a dropped entry
    seed, key, density = 7, "model.layers.0.mlp.up_proj.weight", 0.4
    survived = _dare_alone([phi, phi], 1, density, seed=seed, key=key) != 0
    digest = hashlib.sha256(f"{seed}\0{key}\0{1}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    assert torch.equal(survived, torch.rand(phi.shape, generator=generator) < density)


def test_dare_survivors_are_rescaled_and_the_rest_dropped():
    phi = _randn(30, 30, seed=5)
    out = combine([phi], [1.0], "dare", density=0.3, seed=1, key="w")
    survived = out != 0
    torch.testing.assert_close(out[survived], phi[survived] / 0.3)
    assert 0 < int(survived.sum()) < phi.numel()


def test_dare_survivor_fraction_is_the_density():
    phi = torch.rand(1000, 1000, generator=torch.Generator().manual_seed(6)) + 0.5  # no zeros
    for density in (0.1, 0.5, 0.9):
        fraction = float(torch.count_nonzero(combine([phi], [1.0], "dare", density=density, key="big"))) / phi.numel()
        assert abs(fraction - density) < 5 * (density * (1 - density) / phi.numel()) ** 0.5


def test_dare_preserves_the_expectation():
    phi = _randn(1000, seed=7)
    density, draws = 0.3, 400
    mean = sum(combine([phi], [1.0], "dare", density=density, seed=s, key="w").double() for s in range(draws)) / draws
    sigma = phi.double().abs() * ((1 - density) / (density * draws)) ** 0.5  # std of the mean per entry
    assert bool(((mean - phi.double()).abs() <= 5 * sigma + 1e-12).all())


def test_dare_sums_each_inputs_own_mask():
    deltas = [_randn(12, 9, seed=s) for s in range(3)]
    weights = [1.0, -0.5, 2.0]
    dropped = [_dare_alone(deltas, i, 0.5).double().numpy() for i in range(3)]
    out = combine(deltas, weights, "dare", density=0.5, key="t")
    _close(out, sum(w * x for x, w in zip(dropped, weights)))


def test_dare_is_deterministic_and_keyed():
    phi = _randn(64, 64, seed=8)

    def mask(seed=0, key="a"):
        return combine([phi], [1.0], "dare", density=0.5, seed=seed, key=key) != 0

    first = combine([phi], [1.0], "dare", density=0.5, seed=0, key="a")
    combine([_randn(3, 3, seed=9)], [1.0], "dare", density=0.5, seed=0, key="b")  # other tensors do not matter
    again = combine([phi], [1.0], "dare", density=0.5, seed=0, key="a")
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert not torch.equal(mask(key="a"), mask(key="b"))
    assert not torch.equal(mask(seed=0), mask(seed=1))
    # The input's position is part of the seed: the same φ first and second gets different masks.
    assert not torch.equal(_dare_alone([phi, phi], 0, 0.5, key="a") != 0, _dare_alone([phi, phi], 1, 0.5, key="a") != 0)


def test_dare_density_one_drops_nothing():
    phi = _randn(5, 5, seed=10)
    assert torch.equal(combine([phi], [0.5], "dare", density=1.0), phi * 0.5)


# ---------------------------------------------------------------- DARE-TIES


def test_dare_ties_is_dare_then_unnormalised_consensus():
    deltas = [_randn(10, 11, seed=20 + s) for s in range(3)]
    weights = [1.0, 0.5, -2.0]
    dropped = [_dare_alone(deltas, i, 0.6, seed=3).double().numpy() for i in range(3)]
    out = combine(deltas, weights, "dare-ties", density=0.6, seed=3, key="t")
    _close(out, _ref_consensus(dropped, weights, normalize=False))


def test_dare_ties_hand_example():
    # density 1 keeps everything; +1·2 - 1·3 + 1·0.5 < 0 elects -, only the second agrees: -3 (no division).
    deltas = [_t([2.0, 1.0]), _t([-3.0, 1.0]), _t([0.5, -1.0])]
    _close(combine(deltas, [1.0, 1.0, 1.0], "dare-ties", density=1.0), [-3.0, 2.0])


def test_dare_ties_one_input_density_one_is_weight_times_input():
    phi = _randn(4, 4, seed=11)
    assert torch.equal(combine([phi], [0.5], "dare-ties", density=1.0), phi * 0.5)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs_are_upcast_once(method):
    deltas = [_randn(8, 8, seed=30 + s).bfloat16() for s in range(2)]
    density = None if method == "linear" else 0.5
    out = combine(deltas, [1.0, 0.5], method, density=density, seed=2, key="k")
    assert out.dtype == torch.float32
    assert torch.equal(out, combine([d.float() for d in deltas], [1.0, 0.5], method, density=density, seed=2, key="k"))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "words"),
    [
        (([_t([1.0])], [1.0], "spline"), {}, UsageError, "unknown merge method"),
        (([], [], "linear"), {}, UsageError, "nothing to merge"),
        (([_t([1.0]), _t([2.0])], [1.0], "linear"), {}, UsageError, "1 weights for 2"),
        (([_t([1.0])], [float("nan")], "linear"), {}, UsageError, "not a finite"),
        (([_t([1.0])], [-1.0], "ties"), {"density": 0.5}, UsageError, "weights ≥ 0"),
        (([_t([1.0])], [1.0], "linear"), {"density": 0.5}, UsageError, "takes no density"),
        (([_t([1.0])], [1.0], "ties"), {}, UsageError, "needs a density"),
        (([_t([1.0])], [1.0], "dare"), {"density": 0.0}, UsageError, "(0, 1]"),
        (([_t([1.0])], [1.0], "dare-ties"), {"density": 1.5}, UsageError, "(0, 1]"),
        (([_t([1.0]), _t([1.0, 2.0])], [1.0, 1.0], "linear"), {"key": "w"}, BadInputError, "differ in shape"),
        (([torch.tensor([1, 2])], [1.0], "linear"), {}, BadInputError, "non-floating"),
    ],
)
def test_validation_errors(args, kwargs, error, words):
    with pytest.raises(error) as caught:
        combine(*args, **kwargs)
    assert words in caught.value.message
    assert caught.value.hint
    assert "\n" not in str(caught.value)


def test_negative_weights_where_nothing_divides():
    # A negative weight flips the input's vote: weighted values [-1, 2] and [.5, .5].
    deltas = [_t([1.0, -2.0]), _t([0.5, 0.5])]
    _close(combine(deltas, [-1.0, 1.0], "linear"), [-0.5, 2.5])
    _close(combine(deltas, [-1.0, 1.0], "dare", density=1.0), [-0.5, 2.5])
    # entry 0: -1 + .5 < 0 elects -, only the first agrees; entry 1: both agree on +.
    _close(combine(deltas, [-1.0, 1.0], "dare-ties", density=1.0), [-1.0, 2.5])
