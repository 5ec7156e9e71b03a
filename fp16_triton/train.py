"""The main job: train a tiny GPT on a synthetic task with the engine, ``fp16-triton train``.

The task: sequences drawn from a fixed random Markov chain over a small vocabulary (each token
has a few likely successors). Nothing is downloaded; the best achievable loss is the chain's
entropy rate, which the summary reports next to the final loss. The default DeepSpeed-style
config trains in fp16 with dynamic loss scaling, clipping and a warm-up/decay schedule, and
runs on a CPU in well under a minute; ``--config`` takes a JSON file in the same format.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .engine import initialize

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 100,
    "gradient_clipping": 1.0,
    "fp16": {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 50,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {"warmup_num_steps": 20, "warmup_max_lr": 3e-3, "total_num_steps": 300},
    },
}


@dataclass
class GPTConfig:
    """Sizes of the tiny GPT."""

    vocab: int = 32
    seq_len: int = 32
    dim: int = 64
    heads: int = 4
    layers: int = 2


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """A small decoder-only transformer (token + position embeddings, blocks, tied head)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.positions = nn.Embedding(cfg.seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        # GPT-2's init scale: unit-variance embeddings would give the tied head logits of
        # size ~dim and a first loss far above log(vocab).
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tokens(idx) + self.positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tokens.weight.t()


class MarkovTask:
    """Sequences from a fixed random Markov chain: each token has 3 likely successors."""

    def __init__(self, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab, vocab), -4.0)
        for i in range(vocab):
            logits[i, torch.randperm(vocab, generator=g)[:3]] = torch.tensor([2.0, 1.0, 0.5])
        self.transition = logits.softmax(-1)
        stationary = torch.full((vocab,), 1.0 / vocab)
        for _ in range(200):
            stationary = stationary @ self.transition
        entropy = -(self.transition * self.transition.log()).sum(-1)
        self.entropy_rate = float((stationary * entropy).sum())  # the best achievable loss

    def batch(self, batch: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
        vocab = self.transition.shape[0]
        seq = torch.empty(batch, seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(vocab, (batch,), generator=g)
        for t in range(seq_len):
            seq[:, t + 1] = torch.multinomial(self.transition[seq[:, t]], 1, generator=g)[:, 0]
        return seq


def train(
    config: dict,
    steps: int,
    device: str,
    out_dir: Path | None,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Train the tiny GPT; return a summary dict (and write a plot and a JSON to ``out_dir``)."""
    torch.manual_seed(seed)
    gpt = GPTConfig()
    task = MarkovTask(gpt.vocab, seed)
    model = TinyGPT(gpt).to(device)
    engine, _, _, _ = initialize(model=model, config=config, backend=backend)
    micro_batch = engine.train_micro_batch_size_per_gpu() or 16
    data = torch.Generator().manual_seed(seed + 1)
    losses, scales = [], []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", disable=not progress)
    for step in bar:
        for _ in range(engine.gradient_accumulation_steps()):
            seq = task.batch(micro_batch, gpt.seq_len, data).to(device)
            logits = engine(seq[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, gpt.vocab), seq[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
        # Device values, read once at the end (or every few steps for the bar): no per-step sync.
        losses.append(loss.detach())
        scales.append(engine.optimizer.loss_scaler.scale_tensor.clone())
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                scale=f"{engine.loss_scale:g}",
                skipped=engine.skipped_steps,
            )
    elapsed = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu().tolist()
    scales = torch.stack(scales).float().cpu().tolist()
    tail = losses[-max(1, steps // 10) :]
    summary = {
        "steps": steps,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "device": device,
        "final_loss": sum(tail) / len(tail),
        "initial_loss": losses[0],
        "best_possible_loss": task.entropy_rate,
        "uniform_loss": math.log(gpt.vocab),
        "skipped_steps": engine.skipped_steps,
        "final_loss_scale": engine.loss_scale,
        "seconds": elapsed,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["plot"] = str(plot(losses, scales, out_dir / "train.png", summary))
    return summary


def plot(losses: list[float], scales: list[float], path: Path, summary: dict) -> Path:
    """Loss and loss scale over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(losses, label="training loss")
    top.axhline(summary["best_possible_loss"], color="gray", ls="--", label="entropy rate")
    top.set_ylabel("cross-entropy")
    top.legend()
    bottom.plot(scales, color="tab:orange")
    bottom.set_yscale("log", base=2)
    bottom.set_ylabel("loss scale")
    bottom.set_xlabel("optimizer step")
    fig.suptitle(f"tiny GPT, {summary['dtype']} on {summary['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _steps(text: str) -> int:
    """``--steps``: a positive number of optimizer steps (0 would leave nothing to train and a
    schedule with no length)."""
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps, got {text!r}") from None
    if steps < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 optimizer step, got {steps}")
    return steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fp16-triton train``."""
    parser.add_argument("--config", type=Path, help="DeepSpeed-style JSON config")
    parser.add_argument("--steps", type=_steps, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    """Run ``fp16-triton train``; prints the summary and where the plot is."""
    if args.config is not None:
        config = args.config  # the engine reads and checks the file
    else:
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["scheduler"]["params"]["total_num_steps"] = args.steps
    summary = train(config, args.steps, args.device, args.out, args.seed, args.backend)
    print(
        f"\n{summary['steps']} steps in {summary['seconds']:.1f}s ({summary['dtype']}, "
        f"{summary['device']}): loss {summary['initial_loss']:.3f} -> "
        f"{summary['final_loss']:.3f} (best possible {summary['best_possible_loss']:.3f}, "
        f"uniform {summary['uniform_loss']:.3f}); skipped steps {summary['skipped_steps']}, "
        f"final loss scale {summary['final_loss_scale']:g}\nplot: {summary['plot']}"
    )
    return 0
