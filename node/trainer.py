"""Local training: forward/backward on this node's examples, and applying the swarm's gradient.

The unit of work is a *round*: the swarm's global batch of `target_batch_size` samples,
split among the peers. Each node computes the gradient of the summed token loss over
its share (`local_gradients`), turns it into fixed-point integers per shard
(`node.swarm.exact.to_fixed_point`, applied by node.rounds), the swarm sums those exactly, and every trainer of a shard applies
the same update with the same AdamW (`apply`). The loss a round optimises is
sum(token CE) / sum(tokens) over the global batch, so a swarm and a single process that
sees the same global batch follow the same curve.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from node.manifest import OptimSection
from node.model import Adapter


@dataclass
class LocalResult:
    grad_sums: dict[int, torch.Tensor]  # shard -> flat float32 gradient of the summed token loss
    samples: int
    tokens: int
    loss_sum: float  # sum of token cross-entropies (nats)


def lr_at(round_: int, optim: OptimSection, max_rounds: int) -> float:
    """Learning rate of a round: linear warmup, then constant or cosine to zero at max_rounds."""
    if optim.warmup_rounds and round_ < optim.warmup_rounds:
        return optim.lr * (round_ + 1) / optim.warmup_rounds
    if optim.schedule == "cosine":
        span = max(1, max_rounds - optim.warmup_rounds)
        progress = min(1.0, (round_ - optim.warmup_rounds) / span)
        return optim.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return optim.lr


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions (labels == -100 are ignored)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


class Trainer:
    def __init__(self, model, adapter: Adapter, trained_shards, optim: OptimSection, *, microbatch_size: int, device: str, pad_id: int):
        self.model = model
        self.adapter = adapter
        self.trained = tuple(sorted(trained_shards))
        self.optim_cfg = optim
        self.microbatch_size = microbatch_size
        self.device = device
        self.pad_id = pad_id
        adapter.set_trainable(self.trained)
        self.params = [p for k in self.trained for p in adapter.shard_params(k)]
        # foreach=False: the same per-tensor kernels on every node, so identical inputs give identical bits
        self.optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, foreach=False
        )
        self.opt_step = 0

    # ------------------------------------------------------------------ local work

    def local_gradients(self, examples) -> LocalResult:
        from node.data import collate

        self.model.train()
        for p in self.params:
            p.grad = None
        tokens, loss_sum = 0, 0.0
        for i in range(0, len(examples), self.microbatch_size):
            batch = {k: v.to(self.device) for k, v in collate(examples[i : i + self.microbatch_size], self.pad_id).items()}
            loss, n_tok = token_loss_sum(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} in a local microbatch; lower [optim] lr")
            loss.backward()
            tokens += n_tok
            loss_sum += float(loss.detach())
        grads = {}
        for k in self.trained:
            flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu() for p in self.adapter.shard_params(k)]
            grads[k] = torch.cat(flat)
        for p in self.params:
            p.grad = None
        return LocalResult(grads, len(examples), tokens, loss_sum)

    @torch.no_grad()
    def eval_loss(self, examples) -> tuple[float, int]:
        from node.data import collate

        self.model.eval()
        total, tokens = 0.0, 0
        for i in range(0, len(examples), self.microbatch_size):
            batch = {k: v.to(self.device) for k, v in collate(examples[i : i + self.microbatch_size], self.pad_id).items()}
            loss, n_tok = token_loss_sum(self.model, batch)
            total += float(loss)
            tokens += n_tok
        return total, tokens

    # ------------------------------------------------------------------ updates

    def apply(self, shard_grads: dict[int, torch.Tensor], lr: float) -> None:
        """One AdamW step on the given shards (their grads already averaged); others untouched."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for k, flat in shard_grads.items():
            params = self.adapter.shard_params(k)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
                offset += n
            if self.optim_cfg.max_grad_norm > 0:
                # per shard: every trainer of shard k computes the same norm from the same bits
                torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.max_grad_norm, foreach=False)
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.opt_step += 1

    # ------------------------------------------------------------------ state sharing

    def shard_state(self, k: int) -> list[torch.Tensor]:
        """Adapter tensors of shard k, then AdamW exp_avg and exp_avg_sq (zeros before the first step)."""
        params = self.adapter.shard_params(k)
        out = [p.detach().cpu().clone() for p in params]
        for key in ("exp_avg", "exp_avg_sq"):
            for p in params:
                st = self.optimizer.state.get(p, {})
                out.append(st[key].detach().cpu().clone() if key in st else torch.zeros_like(p, device="cpu"))
        return out

    def shard_step(self, k: int) -> int:
        for p in self.adapter.shard_params(k):
            st = self.optimizer.state.get(p)
            if st and "step" in st:
                return int(st["step"])
        return 0

    def load_shard_state(self, k: int, tensors: list[torch.Tensor], step: int) -> None:
        params = self.adapter.shard_params(k)
        n = len(params)
        if len(tensors) != 3 * n:
            raise ValueError(f"shard {k} state has {len(tensors)} tensors, expected {3 * n}")
        self.adapter.load_shard(k, tensors[:n])
        if k not in self.trained:
            return
        for i, p in enumerate(params):
            if step == 0:
                self.optimizer.state.pop(p, None)
                continue
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[n + i].to(p.device, torch.float32).clone().view_as(p),
                "exp_avg_sq": tensors[2 * n + i].to(p.device, torch.float32).clone().view_as(p),
            }


def grad_commitment(ints: dict[int, torch.Tensor]) -> str:
    """sha256 over the exact fixed-point gradient a node sent, shard by shard."""
    h = hashlib.sha256(b"swarmtune/grad/v1\0")
    for k in sorted(ints):
        h.update(k.to_bytes(4, "big") + ints[k].numpy().tobytes())
    return h.hexdigest()
