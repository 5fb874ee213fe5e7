"""Counting host synchronisations in tests (CPU): Tensor methods that read values back to the host."""

import torch


class SyncCounter:
    """Counts the Tensor methods that read a value back to the host (a device synchronisation on GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))
        real_getitem = torch.Tensor.__getitem__

        def getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
                self.calls.append("boolean-mask indexing")
            return real_getitem(t, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)

    def _wrap(self, name, real):
        def wrapped(t, *args, **kwargs):
            self.calls.append(name)
            return real(t, *args, **kwargs)

        return wrapped
