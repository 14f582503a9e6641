"""One call from a model name to a ready engine: load weights, build the runner, the pool and the engine (with the
model's calibration applied: `kvcomm.calibration.resolve`, which warns when the model has none)."""
from __future__ import annotations

from .anchor_pool import AnchorPool
from .calibration import resolve
from .config import KVCommConfig
from .engine import KVCommEngine
from .model_loading import load_model
from .names import EMBEDDED_MODEL
from .runner import ModelRunner


def build_engine(model: str = EMBEDDED_MODEL, *, device: str = "cpu", dtype: str | None = None,
                 random_weights: bool = False, config: KVCommConfig | None = None,
                 pool: AnchorPool | None = None) -> KVCommEngine:
    loaded = load_model(model, device=device, dtype=dtype, random_weights=random_weights)
    if loaded.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer available; agent templates need one")
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    config, _ = resolve(config or KVCommConfig(), model)
    return KVCommEngine(runner, loaded.tokenizer, config, pool if pool is not None else AnchorPool(config, runner.rope))
