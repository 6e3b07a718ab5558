"""The embedded policy's first load (dequantize the GGUF, fill the cache) must not change what a
seeded run does: the first run on a machine and every later run give the same numbers."""
from pathlib import Path

import torch

from firm import models


def test_filling_the_embedded_cache_leaves_torchs_generator_where_the_seed_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    seeded = torch.get_rng_state().clone()

    path = Path(models.resolve_policy_path(models.EMBEDDED_POLICY))

    assert path.parent == tmp_path / "cache" and (path / "model.safetensors").is_file()  # it did fill the cache
    assert torch.equal(torch.get_rng_state(), seeded)
