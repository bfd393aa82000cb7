"""LoRA on selected blocks through peft: one config object, injected block by block.

Only the LoRA tensors are trainable; the block's own weights stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

# Every linear layer of a block but its AdaLN modulation (peft matches name suffixes): the attention
# projections of every supported family, the feed-forward layers (FLUX/SD3 double-stream blocks, PixArt),
# and FLUX single-stream blocks' MLP input and joint output projections, without which a single block's
# LoRA would reach only its q/k/v. The feed-forward set is what diffusers' FLUX DreamBooth LoRA example
# trains for "all components"; measured here, it raised every fine-tuned row (docs/results.md, "Choices the recipe rests on").
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLP_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), init_lora_weights=True)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def add_lora(block: nn.Module, spec: LoRASpec) -> nn.Module:
    """Inject LoRA layers (B = 0, so the block's output is unchanged) and freeze everything else."""
    present = {n.rsplit(".", 1)[-1] for n, _ in block.named_modules()} | {n for n, _ in block.named_modules()}
    if not any(any(n.endswith(t) for n in present) for t in spec.targets):
        raise ValueError(f"none of the LoRA targets {spec.targets} is a module of this block")
    inject_adapter_in_model(spec.peft_config(), block, adapter_name=ADAPTER_NAME)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
    return block


def lora_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def randomize_lora(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Give every LoRA tensor (B included) random values, for tests that need a non-zero adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_parameters(module).items()):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
