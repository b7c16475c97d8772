"""Local training: forward/backward on this node's examples, the optimizer steps, and the state they keep.

The unit of work is a *round*: the swarm's global batch of `target_batch_size` samples, split
among the peers ([sync] mode = "per-step"), or `inner_steps` such batches ("diloco").

- per-step: each node computes the gradient of the summed token loss over its share
  (`local_gradients`); node.rounds sums the shares exactly across the shard's group, and every
  trainer applies the same AdamW step to the same bits (`apply`). The loss a round optimises is
  sum(token CE) / sum(tokens) over the global batch (DPO: sum(pair loss) / pairs, node.preference),
  so a swarm and a single process that sees the same global batch follow the same curve.
- diloco: each node takes `inner_steps` local AdamW steps on its own shares (`inner_step`, the
  inner optimizer and its moments are this node's alone), node.rounds sums the pseudo-gradients
  (start - end) exactly, and every trainer applies the same outer Nesterov SGD step from the same
  start (`outer_apply`): the outer state (weights, momentum) is bit-identical after every round.
  With [sync] overlap the pseudo-gradient of round r's inner steps is held (`pending`) and summed
  during round r + 1, while that round's inner steps run (from the outer state plus this node's own
  round-r progress): every round still starts from the same outer state on every trainer, and its
  outer step is along the previous round's pseudo-gradient.

State peers share (`shard_state`): a shard's weights and the moments of the optimizer every
trainer runs identically (AdamW's in per-step, the outer momentum in diloco). State only this
node has (`local_tensors`, checkpointed): the inner AdamW moments, the error-feedback residual
(what the wire grid could not carry yet; node.rounds adds it to the next contribution), and with
overlap the pending pseudo-gradient.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from node.manifest import DpoSection, OptimSection, SyncSection
from node.model import Adapter
from node.preference import collate_pairs, dpo_loss, sequence_logps


@dataclass
class LocalResult:
    grad_sums: dict[int, torch.Tensor]  # shard -> flat float32 gradient of the summed token loss
    samples: int
    tokens: int
    loss_sum: float  # sum of token cross-entropies (nats); DPO: sum of the pairs' losses
    # shard -> (microbatches, node.spotcheck.BLOCKS) float32: each microbatch's gradient sketch (spot-check evidence)
    sketches: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Pending:
    """diloco with overlap: the pseudo-gradient of one round's inner steps, summed in the next round."""

    round: int  # the round whose inner steps made it
    delta: dict[int, torch.Tensor]  # per trained shard: the inner steps' start - end
    samples: int
    tokens: int
    loss_sum: float
    indices: tuple = ()  # the examples the inner steps trained on (the record's data commitment)


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
    """`dpo`: train on preference pairs with this [dpo] config (else SFT on token cross-entropy).
    `reference`: the start adapter's tensors (in `adapter.params` order) as DPO's reference policy;
    None = the base with the adapter switched off."""

    def __init__(self, model, adapter: Adapter, trained_shards, optim: OptimSection, *, microbatch_size: int, device: str,
                 pad_id: int, sync: SyncSection | None = None, dpo: DpoSection | None = None,
                 reference: list[torch.Tensor] | None = None):
        self.model = model
        self.dpo = dpo
        self.reference = [t.detach().to(device).clone() for t in reference] if reference is not None else None
        self.adapter = adapter
        self.trained = tuple(sorted(trained_shards))
        self.optim_cfg = optim
        self.sync = sync or SyncSection()
        self.diloco = self.sync.mode == "diloco"
        self.microbatch_size = microbatch_size
        self.device = device
        self.pad_id = pad_id
        adapter.set_trainable(self.trained)
        self.params = [p for k in self.trained for p in adapter.shard_params(k)]

        # foreach=False: the same per-tensor kernels on every node, so identical inputs give identical bits
        def adamw():
            return torch.optim.AdamW(self.params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                     weight_decay=optim.weight_decay, foreach=False)

        if self.diloco:
            self.inner = adamw()  # this node's own: never shared, checkpointed
            momentum = self.sync.outer_momentum
            self.optimizer = torch.optim.SGD(self.params, lr=self.sync.outer_lr, momentum=momentum, nesterov=momentum > 0,
                                             foreach=False)
        else:
            self.inner = None
            self.optimizer = adamw()
        self._shared_keys = ("momentum_buffer",) if self.diloco else ("exp_avg", "exp_avg_sq")
        self.opt_step = 0  # steps of the shared optimizer (the swarm's rounds this state has seen)
        self.inner_steps_done = 0
        # where a round's contribution lives, and with it the codec (node/swarm/exact.py: the same bits on any
        # device): a per-step gradient stays on the model's device; a diloco pseudo-gradient is taken once a
        # round from the CPU copies of the weights (flat_shard), and its round-sized buffers stay off the GPU
        self.contribution_device = torch.device("cpu") if self.diloco else torch.device(device)
        # error feedback: per trained shard, what the wire grid could not carry yet
        self.residual = {k: self.zeros(k) for k in self.trained}
        self.pending: Pending | None = None  # diloco with overlap: the last inner steps' pseudo-gradient, not yet summed

    def zeros(self, k: int) -> torch.Tensor:
        """A contribution of nothing to shard k (float32, where contributions live)."""
        return torch.zeros(self.adapter.shard_numel(k), device=self.contribution_device)

    # ------------------------------------------------------------------ local work

    def local_gradients(self, examples, sketch=None) -> LocalResult:
        """The gradient of the summed loss over `examples`, one microbatch of `microbatch_size` at a time.
        With `sketch` (node.spotcheck.Sketch: spot-checks are on) each microbatch's gradient is computed from
        zero and added to the sum, so recomputing one microbatch alone gives the same bits (a spot-check's
        recomputation), and its projection per trained shard goes to `sketches`; without, the microbatches'
        gradients accumulate in place and are read once."""
        from node.data import collate

        self.model.train()
        for p in self.params:
            p.grad = None
        tokens, loss_sum = 0, 0.0
        sums: dict[int, torch.Tensor] = {}
        sketches: dict[int, list[torch.Tensor]] = {k: [] for k in self.trained}
        for i in range(0, len(examples), self.microbatch_size):
            chunk = examples[i : i + self.microbatch_size]
            if self.dpo is not None:
                loss, n_tok = self.pair_loss_sum(chunk)
            else:
                batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
                loss, n_tok = token_loss_sum(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} in a local microbatch; lower [optim] lr")
            loss.backward()
            tokens += n_tok
            loss_sum += float(loss.detach())
            if sketch is not None:
                for k in self.trained:
                    flat = self._flat_grad(k)
                    sums[k] = flat if k not in sums else sums[k].add_(flat)
                    sketches[k].append(sketch.project(k, flat))
                for p in self.params:
                    p.grad = None
        if sketch is None:
            sums = {k: self._flat_grad(k) for k in self.trained}
        for p in self.params:
            p.grad = None
        grads = {k: (sums[k] if k in sums else torch.zeros(self.adapter.shard_numel(k), device=self.device))
                 for k in self.trained}  # on the model's device
        sketched = {k: torch.stack(v).cpu() for k, v in sketches.items() if v}
        return LocalResult(grads, len(examples), tokens, loss_sum, sketched)

    def _flat_grad(self, k: int) -> torch.Tensor:
        """Shard k's gradient as it stands, flat float32 on the model's device (zeros where none flowed)."""
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in self.adapter.shard_params(k)])

    # ------------------------------------------------------------------ DPO

    def loss_count(self, samples: int, tokens: int) -> int:
        """What a loss sum is divided by to give the objective's mean: tokens (SFT), pairs (DPO)."""
        return samples if self.dpo is not None else tokens

    def pair_loss_sum(self, pairs) -> tuple[torch.Tensor, int]:
        """Summed DPO loss of a microbatch of preference pairs (the gradient flows through the policy only), and
        the completion tokens it scored."""
        batch = {k: v.to(self.device) for k, v in collate_pairs(pairs, self.pad_id).items()}
        ref = self.reference_logps(pairs, batch)
        logps, counts = sequence_logps(self.model, batch)
        losses = dpo_loss(logps, ref, counts, beta=self.dpo.beta, loss=self.dpo.loss)
        return losses.sum(), int(counts.sum())

    @torch.no_grad()
    def reference_logps(self, pairs, batch) -> torch.Tensor:
        """The reference policy's completion log-probs, chosen rows then rejected. The reference never changes in
        a swarm, so each pair's are computed once (in eval mode) and kept with the pair."""
        if any(p.ref is None for p in pairs):
            was_training = self.model.training
            self.model.eval()
            try:
                if self.reference is None:
                    with self.model.disable_adapter():
                        logps, _ = sequence_logps(self.model, batch)
                    # PEFT's enable_adapters marks every active LoRA weight trainable again: ours are per shard
                    self.adapter.set_trainable(self.trained)
                else:
                    self._swap_reference()
                    try:
                        logps, _ = sequence_logps(self.model, batch)
                    finally:
                        self._swap_reference()
            finally:
                self.model.train(was_training)
            chosen, rejected = logps.float().cpu().chunk(2)
            for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
                p.ref = (c, r)
        return torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32,
                            device=self.device)

    def _swap_reference(self) -> None:
        """Exchange the adapter's weights with the reference's (storage only: no copy, optimizer state untouched)."""
        for i, p in enumerate(self.adapter.params):
            self.reference[i], p.data = p.data, self.reference[i]

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

    def _set_grads(self, k: int, flat: torch.Tensor) -> list[torch.nn.Parameter]:
        params = self.adapter.shard_params(k)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
            offset += n
        return params

    def apply(self, shard_grads: dict[int, torch.Tensor], lr: float) -> None:
        """per-step: one AdamW step on the given shards (their grads already summed and scaled); others untouched."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for k, flat in shard_grads.items():
            params = self._set_grads(k, flat)
            if self.optim_cfg.max_grad_norm > 0:
                # per shard: every trainer of shard k computes the same norm from the same bits
                torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.max_grad_norm, foreach=False)
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.opt_step += 1

    def inner_step(self, local: LocalResult, lr: float) -> None:
        """diloco: one local AdamW step on this node's own gradient (mean token loss over its share; DPO: mean
        pair loss)."""
        for group in self.inner.param_groups:
            group["lr"] = lr
        scale = 1.0 / max(self.loss_count(local.samples, local.tokens), 1)
        for k in self.trained:
            params = self._set_grads(k, local.grad_sums[k] * scale)
            if self.optim_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.max_grad_norm, foreach=False)
        self.inner.step()
        for p in self.params:
            p.grad = None
        self.inner_steps_done += 1

    def flat_shard(self, k: int) -> torch.Tensor:
        """Shard k's weights as one float32 vector (a copy, on the CPU)."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.adapter.shard_params(k)])

    @torch.no_grad()
    def load_flat_shard(self, k: int, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.adapter.shard_params(k):
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p).to(p.device, p.dtype))
            offset += n

    @torch.no_grad()
    def outer_step_of(self, k: int, g: torch.Tensor) -> torch.Tensor:
        """diloco: how far (weights before - after, flat, float32) one outer Nesterov SGD step along `g` would move
        shard k from the outer momentum as it is now, without taking it (torch SGD's update: buf = mu * buf + g,
        or g at the first step; step = lr * (g + mu * buf), or lr * g without momentum)."""
        lr, mu = self.sync.outer_lr, self.sync.outer_momentum
        out, offset = [], 0
        for p in self.adapter.shard_params(k):
            n = p.numel()
            gk = g[offset : offset + n].float()
            offset += n
            if mu == 0:
                out.append(lr * gk)
                continue
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            buf = gk if buf is None else mu * buf.detach().reshape(-1).float().cpu() + gk
            out.append(lr * (gk + mu * buf))
        return torch.cat(out)

    def outer_apply(self, start: dict[int, torch.Tensor], deltas: dict[int, torch.Tensor]) -> None:
        """diloco: from the round's start weights, one outer Nesterov SGD step along the group's mean
        pseudo-gradient (start - end). Same start, same sum, same kernels: the same bits on every trainer."""
        for k, flat in start.items():
            self.load_flat_shard(k, flat)
        for k, delta in deltas.items():
            self._set_grads(k, delta)
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.opt_step += 1

    # ------------------------------------------------------------------ state sharing

    def shard_state(self, k: int) -> list[torch.Tensor]:
        """Adapter tensors of shard k, then the shared optimizer's state for them (zeros before its first
        step): AdamW's exp_avg and exp_avg_sq (per-step), or the outer momentum (diloco)."""
        params = self.adapter.shard_params(k)
        out = [p.detach().cpu().clone() for p in params]
        for key in self._shared_keys:
            for p in params:
                st = self.optimizer.state.get(p, {})
                out.append(st[key].detach().cpu().clone() if st.get(key) is not None else torch.zeros_like(p, device="cpu"))
        return out

    def shard_step(self, k: int) -> int:
        """The optimizer step count shard k's state belongs to: AdamW's own count for its parameters (a round
        that applied only some shards advanced only theirs, so `opt_step` can be ahead of it), or the outer
        step count in diloco (its SGD keeps none)."""
        if self.diloco:
            return self.opt_step
        for p in self.adapter.shard_params(k):
            st = self.optimizer.state.get(p)
            if st and "step" in st:
                return int(st["step"])
        return 0

    def load_shard_state(self, k: int, tensors: list[torch.Tensor], step: int) -> None:
        params = self.adapter.shard_params(k)
        n = len(params)
        width = 1 + len(self._shared_keys)
        if len(tensors) != width * n:
            raise ValueError(f"shard {k} state has {len(tensors)} tensors, expected {width * n}")
        self.adapter.load_shard(k, tensors[:n])
        if k not in self.trained:
            return
        for i, p in enumerate(params):
            if step == 0:
                self.optimizer.state.pop(p, None)
                continue
            state = {key: tensors[(j + 1) * n + i].to(p.device, torch.float32).clone().view_as(p)
                     for j, key in enumerate(self._shared_keys)}
            if not self.diloco:
                state["step"] = torch.tensor(float(step))
            self.optimizer.state[p] = state

    # ------------------------------------------------------------------ this node's own state (checkpointed)

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """What only this node holds: residuals per trained shard, and (diloco) the inner AdamW moments."""
        out = {f"residual/{k}": r.cpu().clone() for k, r in self.residual.items()}
        if self.pending is not None:
            pend = self.pending
            out |= {f"pending/{k}": v.clone() for k, v in pend.delta.items()}
            out["pending/meta"] = torch.tensor([pend.round, pend.samples, pend.tokens, pend.loss_sum], dtype=torch.float64)
            out["pending/indices"] = torch.tensor(pend.indices, dtype=torch.int64)
        if self.inner is not None:
            for name, p in zip(self.adapter.names, self.adapter.params):
                st = self.inner.state.get(p)
                if st and "exp_avg" in st:
                    out[f"inner_exp_avg/{name}"] = st["exp_avg"].detach().cpu().clone()
                    out[f"inner_exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().cpu().clone()
                    out[f"inner_step/{name}"] = torch.tensor([float(st["step"])])
        return out

    def load_local_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in self.trained:
            r = tensors.get(f"residual/{k}")
            if r is not None and r.numel() == self.residual[k].numel():
                self.residual[k] = r.to(self.contribution_device, torch.float32).clone()
        meta = tensors.get("pending/meta")
        parts = {k: tensors.get(f"pending/{k}") for k in self.trained}
        if meta is not None and all(v is not None and v.numel() == self.residual[k].numel() for k, v in parts.items()):
            rnd, samples, tokens, loss_sum = meta.tolist()
            indices = tuple(int(i) for i in tensors.get("pending/indices", torch.zeros(0, dtype=torch.int64)).tolist())
            self.pending = Pending(int(rnd), {k: v.float().clone() for k, v in parts.items()}, int(samples), int(tokens),
                                   float(loss_sum), indices)
        if self.inner is None:
            return
        for name, p in zip(self.adapter.names, self.adapter.params):
            if p.requires_grad and f"inner_exp_avg/{name}" in tensors:
                self.inner.state[p] = {
                    "step": torch.tensor(float(tensors[f"inner_step/{name}"][0])),
                    "exp_avg": tensors[f"inner_exp_avg/{name}"].to(p.device, torch.float32).clone().view_as(p),
                    "exp_avg_sq": tensors[f"inner_exp_avg_sq/{name}"].to(p.device, torch.float32).clone().view_as(p),
                }


def grad_commitment(sent: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 over the contribution a node sent, shard by shard: {shard: (the group's grid, int8 per block; this
    node's integer parts on it)}, both on the host. The parts are the bytes that crossed the wire, and with the
    grid they fix what was sent (q * 2**e) exactly, without bringing float32 values off a GPU to hash them."""
    h = hashlib.sha256(b"swarmtune/grad/v2\0")
    for k in sorted(sent):
        exps, part = sent[k]
        h.update(k.to_bytes(4, "big") + exps.numel().to_bytes(4, "big") + exps.numpy().tobytes()
                 + str(part.dtype).encode() + b"\0" + part.numpy().tobytes())
    return h.hexdigest()
