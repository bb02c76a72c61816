"""Record a real MoE model's routing, for `moe_offload_gpu.py --routes` to replay at full size.

Loads any transformers MoE checkpoint, hooks each MoE layer's router (a `gate` or `router` module beside an
`experts` module), greedily generates from a few prompts, and saves, for every token the model ran (prompt and
generated alike), each MoE layer's top-k expert ids (`route_file.RecordedRoutes`, an `.npz`). A router that
returns its top-k ids gives them; one that returns logits gives their top-k.

    python -m benchmarks.record_routes Qwen/Qwen3-Next-80B-A3B-Instruct --out routes.npz --tokens 256
    python -m benchmarks.record_routes ./tiny-checkpoint --device cpu --out /tmp/routes.npz --tokens 8
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.route_file import RecordedRoutes

DEFAULT_PROMPTS = (
    "Explain how a mixture-of-experts language model decides which experts process a token.",
    "Write a short Python function that merges two sorted lists, then explain its running time.",
    "Summarize the causes and consequences of the French Revolution in a few paragraphs.",
    "Translate into German: The train to Berlin leaves at seven, so we should pack tonight.",
    "A farmer has 17 sheep and all but 9 run away. How many are left? Reason step by step.",
)
ROUTER_NAMES = ("gate", "router")


def find_routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Each MoE layer's router, in model order: a `gate` or `router` child of a module that also holds
    `experts`."""
    routers = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" in children:
            router = next((children[n] for n in ROUTER_NAMES if n in children), None)
            if router is not None:
                routers.append((f"{name}.{next(n for n in ROUTER_NAMES if n in children)}", router))
    return routers


def top_k_ids(output, top_k: int) -> torch.Tensor:
    """[tokens, k] expert ids from what a router returned: its ids, or its logits' top-k."""
    parts = output if isinstance(output, tuple) else (output,)
    for part in parts:
        if isinstance(part, torch.Tensor) and not part.is_floating_point() and part.shape[-1] == top_k:
            return part.reshape(-1, top_k)
    logits = next(p for p in parts if isinstance(p, torch.Tensor) and p.is_floating_point())
    return torch.topk(logits.reshape(-1, logits.shape[-1]), top_k, dim=-1).indices


class RouteRecorder:
    """Forward hooks on the routers; `ids()` gives [tokens, layers, k] for everything run since the start."""

    def __init__(self, routers: list[torch.nn.Module], top_k: int):
        self.top_k = top_k
        self._per_layer: list[list[torch.Tensor]] = [[] for _ in routers]
        self._hooks = [
            router.register_forward_hook(lambda m, args, out, i=i: self._per_layer[i].append(top_k_ids(out, top_k)))
            for i, router in enumerate(routers)
        ]

    def tokens(self) -> int:
        return sum(ids.shape[0] for ids in self._per_layer[0])

    def ids(self) -> np.ndarray:
        layers = [torch.cat(ids).cpu() for ids in self._per_layer]
        return torch.stack(layers, dim=1).numpy()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def main(argv: list[str] | None = None) -> RecordedRoutes:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a hub id or a local checkpoint folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=256, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=Path, default=None, help="a text file, one prompt a line")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    prompts = args.prompts.read_text().splitlines() if args.prompts else list(DEFAULT_PROMPTS)
    prompts = [p for p in prompts if p.strip()]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device).eval()
    config = model.config.get_text_config()
    top_k = int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "moe_topk", 0))
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))
    routers = find_routers(model)
    if not routers or not top_k or not experts:
        parser.error(f"{args.model}: no MoE routers found (or no num_experts / num_experts_per_tok in its config)")
    recorder = RouteRecorder([router for _, router in routers], top_k)
    starts = []
    with torch.inference_mode():
        for prompt in prompts:
            starts.append(recorder.tokens())
            inputs = tokenizer(prompt, return_tensors="pt").to(args.device)
            model.generate(
                **inputs,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
    recorder.close()
    routes = RecordedRoutes(recorder.ids(), experts, args.model, starts)
    routes.save(args.out)
    print(
        f"# {routes.tokens} tokens x {routes.layers} MoE layers x top-{routes.top_k} of {experts} experts, "
        f"{len(prompts)} prompts -> {args.out}"
    )
    return routes


if __name__ == "__main__":
    main()
