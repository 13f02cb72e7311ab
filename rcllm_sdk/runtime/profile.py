"""Where an ``rcllm`` request's time goes: wall time per stage, measured by wrappers and
module hooks attached to one engine (nothing is timed inline in the serving path).

Stages: the engine's steps (store read with its codec, unpack and header check, assembly,
re-rotation, batch planning, label logits), the attention backend's planning and per-layer
call, and per layer the q/k/v/o projections, the MLP and the norms (forward hooks). What is
left of a request's wall time is the Python between them (``other``). CPU timings; on CUDA
every stage synchronises, so the profile is slower than serving there.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import torch

ENGINE_STEPS = {
    "_read": "store read + codec",
    "_unpack_all": "unpack + header check + copy to the device",
    "_gather": "assembly (one concat)",
    "_shift": "re-rotation (all layers)",
    "_plan_batch": "batch planning (rows, offsets)",
    "_scored": "label logits",
}
MODULES = {
    "mlp": ("mlp",),
    "projections": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "norms": ("input_layernorm", "post_attention_layernorm"),
}


class Profile:
    """Accumulated stage times of the requests run through :meth:`request` while attached."""

    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)
        self.total_ms, self.requests = 0.0, 0
        self._handles: list = []
        self._sync = lambda: None
        self._attention = None

    def attach(self, engine) -> None:
        """Wrap ``engine``'s steps and attention backend, hook its layers' modules."""
        if engine.view.device.type == "cuda":
            self._sync = torch.cuda.synchronize
        for method, stage in ENGINE_STEPS.items():
            setattr(engine, method, self._timed(stage, getattr(engine, method)))
        a = self._attention = engine.attention
        engine.attention = replace(
            a,
            plan=self._timed("attention planning", a.plan),
            attend=self._timed("attention (per layer)", a.attend),
        )
        for layer in engine.view.layers:
            for stage, paths in MODULES.items():
                for path in paths:
                    self._hook(layer.get_submodule(path), stage)

    def detach(self, engine) -> None:
        """Remove the hooks and wrappers (the engine serves untimed again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for method in ENGINE_STEPS:
            vars(engine).pop(method, None)
        engine.attention = self._attention

    def request(self, fn):
        """Run one request, adding its wall time to the total."""
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        self.total_ms += (time.perf_counter() - t0) * 1000.0
        self.requests += 1
        return out

    def report(self) -> dict:
        """Mean ms per request of each stage, ``other`` (the rest) and ``total``."""
        n = max(self.requests, 1)
        stages = {name: ms / n for name, ms in sorted(self.ms.items(), key=lambda kv: -kv[1])}
        stages["other (Python between stages)"] = max(self.total_ms / n - sum(stages.values()), 0.0)
        return {"requests": self.requests, "total_ms": self.total_ms / n, "stages_ms": stages}

    def _timed(self, stage: str, fn):
        def timed(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.ms[stage] += (time.perf_counter() - t0) * 1000.0

        return timed

    def _hook(self, module: torch.nn.Module, stage: str) -> None:
        started: list[float] = []

        def before(*_):
            self._sync()
            started.append(time.perf_counter())

        def after(*_):
            self._sync()
            self.ms[stage] += (time.perf_counter() - started.pop()) * 1000.0

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def markdown(profile: dict) -> str:
    """The profile as a table: stage, ms per request, share of the request."""
    total = profile["total_ms"]
    lines = ["| stage | ms / request | share |", "|---|---|---|"]
    for stage, ms in profile["stages_ms"].items():
        lines.append(f"| {stage} | {ms:.3f} | {ms / total:.1%} |")
    lines.append(f"| total | {total:.3f} | 100% |")
    return "\n".join(lines)
