"""Recorded routing: for each token, for each MoE layer, the top-k expert ids a real model's router chose.

One `.npz` file: `ids` int16 [tokens, layers, k] (int32 past 32,767 experts), and `meta`, a JSON string:
model, experts per layer, k, and where each prompt's tokens start (`prompt_starts`). Tokens run in the order
the model saw them, prompt tokens and generated ones alike, prompt after prompt.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RecordedRoutes:
    ids: np.ndarray  # [tokens, layers, k]
    experts: int
    model: str = ""
    prompt_starts: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def layers(self) -> int:
        return self.ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.ids.shape[2]

    def save(self, path: Path) -> None:
        dtype = np.int16 if self.experts <= np.iinfo(np.int16).max else np.int32
        meta = {"model": self.model, "experts": self.experts, "prompt_starts": self.prompt_starts}
        with open(path, "wb") as file:  # a file object: numpy would otherwise append .npz to the name
            np.savez_compressed(file, ids=self.ids.astype(dtype), meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: Path) -> "RecordedRoutes":
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            ids = data["ids"].astype(np.int64)
        if ids.ndim != 3 or not len(ids):
            raise ValueError(f"{path}: ids must be [tokens, layers, k] with at least one token, got {ids.shape}")
        if ids.min() < 0 or ids.max() >= meta["experts"]:
            raise ValueError(f"{path}: expert ids outside 0..{meta['experts'] - 1}")
        return cls(ids, meta["experts"], meta.get("model", ""), meta.get("prompt_starts", []))

    def check_fits(self, layers: int, experts: int, top_k: int) -> None:
        """Refuse a recording whose shape the model at hand cannot replay."""
        if (self.layers, self.experts, self.top_k) != (layers, experts, top_k):
            raise ValueError(
                f"recorded routes are for {self.layers} MoE layers x {self.experts} experts, top-{self.top_k}; "
                f"this model has {layers} x {experts}, top-{top_k}"
            )
