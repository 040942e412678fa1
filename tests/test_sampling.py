"""server/sampling.py's top_k: a row gets the same ids and the same probability bits alone (the one-row
gather, `p[:, ids[0]]`) as in a batch (`_take_rows`), as its docstring promises."""
from __future__ import annotations

import numpy as np
import pytest
from rnnserve.server.sampling import top_k


def _rows(rng: np.random.Generator, n: int, V: int) -> np.ndarray:
    """Logits with the cases that could tell two code paths apart: ties, tiny and huge spreads, -inf."""
    x = rng.standard_normal((n, V)).astype(np.float32) * rng.choice([0.05, 1.0, 30.0], size=(n, 1))
    x[::3] = np.round(x[::3])  # many exact ties
    x[1::7] = 1e-7 * rng.integers(-2, 3, size=(len(x[1::7]), V))  # ties only after exp and the division
    x[2::11, : V // 4] = -np.inf  # masked tokens
    return x.astype(np.float32)


@pytest.mark.parametrize("V", [2, 65, 129, 1000])
def test_top_k_of_a_row_alone_equals_its_row_in_a_batch_bitwise(V: int) -> None:
    rng = np.random.default_rng(V)
    x = _rows(rng, 400, V)
    for k in (1, 5, V, V + 3):
        ids_b, probs_b = top_k(x, k)  # (n, K) in a batch
        for i in range(len(x)):
            ids_1, probs_1 = top_k(x[i:i + 1], k)  # alone
            assert ids_1.shape == (1, min(k, V)) and ids_1.dtype == ids_b.dtype and probs_1.dtype == np.float32
            np.testing.assert_array_equal(ids_1[0], ids_b[i])
            np.testing.assert_array_equal(probs_1[0].view(np.int32), probs_b[i].view(np.int32))


def test_one_row_top_k_of_a_strided_row() -> None:
    x = _rows(np.random.default_rng(1), 8, 130)[:, ::2]  # (8, 65) rows not contiguous in memory
    ids_b, probs_b = top_k(np.ascontiguousarray(x), 5)
    for i in range(len(x)):
        ids_1, probs_1 = top_k(x[i:i + 1], 5)
        np.testing.assert_array_equal(ids_1[0], ids_b[i])
        np.testing.assert_array_equal(probs_1[0].view(np.int32), probs_b[i].view(np.int32))


def test_top_k_orders_ties_by_token_id_and_sums_to_one() -> None:
    ids, probs = top_k(np.array([[0.0, 2.0, 1.0, 2.0, 2.0]], np.float32), 4)
    assert ids.tolist() == [[1, 3, 4, 2]]
    _, full = top_k(np.array([[0.0, 2.0, 1.0, 2.0, 2.0]], np.float32), 5)
    assert abs(float(full.sum()) - 1.0) < 1e-6 and probs[0, 0] == probs[0, 1] == probs[0, 2] > probs[0, 3]
