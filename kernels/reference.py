"""Plain numpy references for the kernels, written for clarity, not speed."""

import numpy as np

__all__ = ["history_exchange_reference", "representation_noise_reference"]


def history_exchange_reference(bank, visits, indices, values, momentum):
    """What `kernels.history_exchange` must do, one distinct index at a time.

    Args:
      bank: np array (N, d), float32 or ml_dtypes.bfloat16 (the storage dtype).
      visits: np int array (N,).
      indices: int (B,).
      values: float (B, d).
      momentum: float m.

    Returns:
      (old_rows float32 (B, d), seen bool (B,), new_bank (N, d) in bank's
      dtype, new_visits (N,)); the inputs are not modified.
    """
    bank = np.asarray(bank)
    visits = np.asarray(visits)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float32).reshape(len(indices), bank.shape[1])
    m = np.float32(momentum)

    old_rows = bank[indices].astype(np.float32)
    seen = visits[indices] > 0
    new_bank = bank.copy()
    new_visits = visits.copy()
    for u in np.unique(indices):
        v = values[indices == u].mean(axis=0, dtype=np.float32)
        if visits[u] == 0:
            row = v
        else:
            row = m * bank[u].astype(np.float32) + (np.float32(1) - m) * v
        new_bank[u] = row.astype(bank.dtype)
        new_visits[u] = visits[u] + 1
    return old_rows, seen, new_bank, new_visits


def representation_noise_reference(x, scale, eps):
    """`x + scale * std_batch(x) * eps` in float32, returned in x's dtype."""
    x = np.asarray(x)
    x32 = x.astype(np.float32)
    std = x32.std(axis=0, keepdims=True)  # Population std (ddof=0).
    out = x32 + np.float32(scale) * std * np.asarray(eps, np.float32)
    return out.astype(x.dtype)
