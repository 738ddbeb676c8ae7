#!/usr/bin/env python3
# ===- train_lm.py - A small MoE transformer language model, trained ------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Trains a small decoder-only transformer whose feed-forward blocks are
# flexmoe.MoELayer (Flex's compiled MoE layer), on a synthetic language
# generated here: a fixed random Markov chain over the vocabulary, each token
# followed by one of four successors with probabilities 0.55/0.25/0.15/0.05
# (an entropy of 1.1 nats, against ln(vocab) for a model that knows nothing),
# so the loss has far to fall and the data needs no download.
#
#   python examples/python/train_lm.py                      # CPU, f32
#   python examples/python/train_lm.py --device cuda --dtype bf16 --steps 300
#   python examples/python/train_lm.py --steps 30 --check   # what CI runs
#
# On several ranks (torchrun: gloo on CPUs, NCCL on GPUs) each rank draws its
# own batches and holds E / W experts of every layer; the dense parameters'
# and the router's gradients are averaged over the ranks, the experts' (which
# already sum every rank's tokens) divided by W. --save DIR writes each
# rank's state_dict (DIR/rank<r>.pt) and the loss on a fixed evaluation set
# (DIR/eval.json); --load DIR starts from such files, which must be for this
# run's number of ranks (`python -m flexmoe.checkpoint convert` re-cuts them),
# and --expect FILE requires the evaluation loss FILE holds (1e-5, f32):
#
#   torchrun --nproc-per-node 2 examples/python/train_lm.py --steps 20 \
#       --save /tmp/lm2
#   python -m flexmoe.checkpoint convert /tmp/lm2/rank*.pt -w 1 \
#       -o /tmp/lm1/rank{rank}.pt
#   python examples/python/train_lm.py --load /tmp/lm1 --steps 0 \
#       --expect /tmp/lm2/eval.json
#
# --check also runs, at every step, a twin model whose MoE layers are plain
# PyTorch (the same contract: softmax top-k gate, normalized gates, capacity
# slots in Flex's order, GShard l_aux; computed in f32) with the model's
# current weights on the same batch, and requires the loss, l_aux and every
# gradient (f32; bf16/f16: the loss and l_aux) to agree within [num-1]'s
# tolerance (relative L2: 1e-5 f32, 2e-2 bf16/f16), except at a step where a
# token's scores tie to f32's resolution (NEAR_TIE). The run fails (exit 1)
# when they do not, or when the loss did not fall by --min-drop.
#
# ===----------------------------------------------------------------------=== #

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import flexmoe
except ImportError:  # run from the repository, flexmoe not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
    import flexmoe

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16,
          "f16": torch.float16}
SUCCESSOR_PROBS = (0.55, 0.25, 0.15, 0.05)
# --check: a step that differs from the plain layers beyond the tolerance is
# excused when two of a token's top k + 1 scores are closer than this (f32
# rounding may then pick either expert; the layers are right either way).
NEAR_TIE = 1e-6


class MarkovText:
    """Batches of token sequences from a fixed random Markov chain."""

    def __init__(self, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        # Each token's four successors, distinct from one another.
        self.successors = torch.stack(
            [torch.randperm(vocab, generator=g)[:len(SUCCESSOR_PROBS)]
             for _ in range(vocab)])
        self.probs = torch.tensor(SUCCESSOR_PROBS)
        self.generator = g

    def entropy(self):
        return float(-(self.probs * self.probs.log()).sum())

    def batch(self, batch, seq):
        g = self.generator
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (batch,), generator=g)
        for t in range(seq):
            choice = torch.multinomial(self.probs, batch, replacement=True,
                                       generator=g)
            tokens[:, t + 1] = self.successors[tokens[:, t], choice]
        return tokens[:, :-1], tokens[:, 1:]


class TorchMoE(torch.nn.Module):
    """The same MoE function in plain PyTorch (the --check twin): Flex's
    parameters (wg [d, E], w1 [E, d, h], w2 [E, h, d]), fixed capacity
    k * int(f * ceil(T / E)) slots per expert filled choice by choice in
    token order ([loc-1]), normalized top-k gates, the GShard l_aux."""

    def __init__(self, flex):
        super().__init__()
        self.wg = torch.nn.Parameter(flex.wg.detach().clone())
        self.w1 = torch.nn.Parameter(flex.w1.detach().clone())
        self.w2 = torch.nn.Parameter(flex.w2.detach().clone())
        self.k, self.factor = flex.top_k, flex.capacity_factor
        self.activation = getattr(F, flex.activation)

    def forward(self, x):
        # Computed in f32 (the reference of a bf16/f16 layer), returned in
        # the input's dtype.
        shape, d, dtype = x.shape, x.shape[-1], x.dtype
        x = x.reshape(-1, d).float()
        w1, w2 = self.w1.float(), self.w2.float()
        T, E, k = x.shape[0], self.wg.shape[1], self.k
        scores = torch.softmax(x @ self.wg.float(), dim=1)
        order = torch.argsort(-scores, dim=1, stable=True)
        idx = order[:, :k]
        # How close this call came to another routing: the smallest gap
        # between adjacent scores among each token's top k + 1.
        top = scores.detach().gather(1, order[:, :k + 1])
        self.min_gap = float((top[:, :-1] - top[:, 1:]).min()) \
            if top.shape[1] > 1 else 1.0
        gates = scores.gather(1, idx)
        gates = gates / gates.sum(1, keepdim=True).clamp(
            min=torch.finfo(torch.float32).eps)
        # Slot of each (token, choice): all first choices, then seconds.
        onehot = F.one_hot(idx.t().reshape(-1), E)
        slot = ((onehot.cumsum(0) - 1) * onehot).sum(1).view(k, T).t()
        capacity = k * int(self.factor * math.ceil(T / E))
        out = torch.zeros_like(x)
        for e in range(E):
            token, choice = ((idx == e) & (slot < capacity)).nonzero(
                as_tuple=True)
            y = self.activation(x[token] @ w1[e]) @ w2[e]
            out = out.index_add(0, token, y * gates[token, choice, None])
        frac = F.one_hot(idx[:, 0], E).float().mean(0)
        l_aux = E * (scores.mean(0) * frac).sum()
        return out.to(dtype).view(shape), l_aux


class Block(torch.nn.Module):
    """Pre-norm causal self-attention, then the MoE feed-forward."""

    def __init__(self, d, heads, moe):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(d)
        self.moe = moe

    def forward(self, x, mask):
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + a
        y, l_aux = self.moe(self.ln2(x))
        return x + y, l_aux


class MoELM(torch.nn.Module):

    def __init__(self, args):
        super().__init__()
        d = args.d_model
        self.embed = torch.nn.Embedding(args.vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(args.seq, d) * 0.02)
        self.blocks = torch.nn.ModuleList([
            Block(d, args.heads, flexmoe.MoELayer(
                d, args.hidden, args.experts, top_k=args.top_k,
                capacity_factor=args.capacity_factor, activation="gelu"))
            for _ in range(args.layers)])
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, args.vocab, bias=False)

    def forward(self, tokens):
        seq = tokens.shape[1]
        mask = torch.full((seq, seq), float("-inf"), device=tokens.device,
                          dtype=self.pos.dtype).triu(1)
        x = self.embed(tokens) + self.pos[:seq]
        l_aux = 0.0
        for block in self.blocks:
            x, aux = block(x, mask)
            l_aux = l_aux + aux
        return self.head(self.norm(x)).float(), l_aux / len(self.blocks)


def torch_twin(model):
    """The model with every flexmoe layer replaced by TorchMoE, with the same
    weights."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.moe = TorchMoE(block.moe)
    return twin


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Trains a small MoE transformer language model with "
        "flexmoe.MoELayer on a synthetic Markov-chain language.")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="f32", choices=list(DTYPES))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128,
                   help="hidden size of each expert")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--aux-weight", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="compare every step with plain PyTorch MoE layers of "
                   "the same weights, and require the loss to fall")
    p.add_argument("--min-drop", type=float, default=0.3,
                   help="--check: the fraction by which the mean loss of the "
                   "last 5 steps must be below the first step's")
    p.add_argument("--tolerance", type=float, default=None,
                   help="--check: largest relative difference to the plain "
                   "layers (default [num-1]: 1e-5 f32, 2e-2 bf16/f16)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save", metavar="DIR",
                   help="write each rank's state_dict and the evaluation "
                   "loss here after training")
    p.add_argument("--load", metavar="DIR",
                   help="start from DIR/rank<r>.pt (for this run's ranks)")
    p.add_argument("--expect", metavar="FILE",
                   help="require the evaluation loss of this eval.json")
    p.add_argument("--eval-batch", type=int, default=16,
                   help="sequences of the evaluation set")
    p.add_argument("--global-batch", type=int, default=0,
                   help="every step, one batch of this many sequences drawn "
                   "alike on every rank, each rank training on its 1/W "
                   "slice (so W ranks take the steps one rank takes; "
                   "default: --batch sequences of each rank's own)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--eval-chunks", type=int, default=4,
                   help="calls the evaluation set is cut into (a multiple "
                   "of the ranks; the same on every run that compares)")
    return p.parse_args(argv)


def init_ranks(args):
    """(rank, world size): torchrun's when its variables are set (the
    process group made here), else (0, 1)."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return rank, world


def average_gradients(model, world):
    """Data parallel over the ranks: each rank's loss is the mean over its
    own tokens, the model's loss the mean of the ranks'. Dense parameters
    and the (replicated) router: the ranks' gradients averaged. Expert
    slices: their gradient already sums every rank's loss, so / W."""
    import torch.distributed as dist
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "_flexmoe_expert", False):
            p.grad.div_(world)
        else:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def evaluate(model, args, device, chunks):
    """The mean loss over a fixed evaluation set (the training language,
    sequences drawn apart from every rank's batches), in `chunks` calls of
    eval_batch / chunks sequences, chunks / W of them on each of W ranks
    (every rank makes the same number of calls: they exchange tokens), so
    runs of any number of ranks dividing `chunks` make the same calls (and
    capacities) and a converted checkpoint gives the same loss."""
    import torch.distributed as dist
    data = MarkovText(args.vocab, args.seed)  # the training language
    data.generator.manual_seed(args.seed * 1000)  # sequences of its own
    inputs, targets = data.batch(args.eval_batch, args.seq)
    rank, world = (dist.get_rank(), dist.get_world_size()) \
        if dist.is_initialized() else (0, 1)
    per = args.eval_batch // chunks
    share = chunks // world
    mine = range(rank * share, (rank + 1) * share)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for c in mine:
            x = inputs[c * per:(c + 1) * per].to(device)
            y = targets[c * per:(c + 1) * per].to(device)
            logits, _ = model(x)
            total[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                        y.reshape(-1), reduction="sum")
            total[1] += y.numel()
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def forward_backward(model, inputs, targets, aux_weight):
    """The step's loss and l_aux; the gradients are left in the model."""
    logits, l_aux = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           targets.reshape(-1))
    model.zero_grad(set_to_none=True)
    (loss + aux_weight * l_aux).backward()
    return loss.detach(), l_aux.detach()


def rel_diff(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_step(model, twin, inputs, targets, aux_weight, loss, l_aux):
    """The twin, given the model's current weights, computes the same step:
    the largest relative difference of the loss, l_aux and (f32) any
    gradient. In bf16/f16 only the loss and l_aux are compared: a rounding
    of the MoE output moves the next block's routing near its many bf16
    ties, and the whole model's gradients with it."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in twin.named_parameters():
            p.copy_(params[name])
    t_loss, t_aux = forward_backward(twin, inputs, targets, aux_weight)
    diffs = {"loss": rel_diff(loss, t_loss), "l_aux": rel_diff(l_aux, t_aux)}
    if model.embed.weight.dtype == torch.float32:
        for name, p in twin.named_parameters():
            diffs["grad " + name] = rel_diff(params[name].grad, p.grad)
    name = max(diffs, key=diffs.get)
    gap = min(block.moe.min_gap for block in twin.blocks)
    return diffs[name], name, gap


def main(argv=None):
    args = parse_args(argv)
    rank, world = init_ranks(args)
    if args.check and world > 1:
        print("--check compares with a one-rank twin: run it on one rank")
        return 2
    torch.manual_seed(args.seed)  # the same dense weights on every rank
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    data = MarkovText(args.vocab, args.seed)
    if args.global_batch and args.global_batch % world:
        print(f"--global-batch {args.global_batch} must be a multiple of the "
              f"{world} ranks")
        return 2
    if world > 1 and not args.global_batch:  # each rank its own batches
        data.generator.manual_seed(args.seed * 1000 + 1 + rank)
    model = MoELM(args).to(device=device, dtype=dtype)
    expected = None
    if args.expect:
        expected = json.loads(Path(args.expect).read_text())
    if args.load:
        state = torch.load(Path(args.load) / f"rank{rank}.pt",
                           map_location=device, weights_only=True)
        model.load_state_dict(state)
        print(f"rank {rank}: loaded {args.load}/rank{rank}.pt")
    twin = torch_twin(model) if args.check else None
    optimizer = (torch.optim.SGD if args.optimizer == "sgd" else
                 torch.optim.AdamW)(model.parameters(), lr=args.lr)
    tolerance = args.tolerance or (1e-5 if dtype == torch.float32 else 2e-2)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"flexmoe {flexmoe.__version__} on {device} ({args.dtype}), "
        f"{world} rank(s): "
        f"{args.layers} layers, d {args.d_model}, {args.experts} experts "
        f"of h {args.hidden}, top-{args.top_k}, {args.batch}x{args.seq} "
        f"tokens per step per rank; the language's entropy is "
        f"{data.entropy():.3f} nats, ln(vocab) {math.log(args.vocab):.3f}")
    losses, worst, ties = [], (0.0, ""), 0
    start = time.perf_counter()
    for i in range(args.steps):
        if args.global_batch:
            per = args.global_batch // world
            inputs, targets = (t[rank * per:(rank + 1) * per].to(device)
                               for t in data.batch(args.global_batch,
                                                   args.seq))
        else:
            inputs, targets = (t.to(device) for t in data.batch(args.batch,
                                                               args.seq))
        loss, l_aux = forward_backward(model, inputs, targets,
                                       args.aux_weight)
        losses.append(float(loss))
        line = f"step {i:4d}  loss {float(loss):.4f}  l_aux {float(l_aux):.4f}"
        if twin is not None:
            diff, what, gap = check_step(model, twin, inputs, targets,
                                         args.aux_weight, loss, l_aux)
            line += f"  vs torch: {diff:.1e} ({what})"
            if diff > tolerance and gap < NEAR_TIE:
                # Two scores equal to f32's resolution: the top-k choice
                # there is arbitrary, and either answer is right.
                ties += 1
                line += f", excused: a routing near-tie (gap {gap:.1e})"
                print(line)
            elif diff > tolerance:
                print(line)
                print(f"FAILED: step {i}: flexmoe's {what} differs from the "
                      f"plain PyTorch layer's by {diff:.2e} (relative) > "
                      f"{tolerance}")
                return 1
            else:
                worst = max(worst, (diff, what))
        if world > 1:
            average_gradients(model, world)
        optimizer.step()
        if i % args.log_every == 0 or i == args.steps - 1:
            say(line, flush=True)
    seconds = time.perf_counter() - start
    if losses:
        first, last = losses[0], sum(losses[-5:]) / len(losses[-5:])
        drop = 1 - last / first
        say(f"loss {first:.4f} -> {last:.4f} (mean of the last 5 steps, rank "
            f"0): down {100 * drop:.1f}% in {args.steps} steps, "
            f"{seconds:.1f} s")
    if args.save or expected:
        chunks = expected["chunks"] if expected else args.eval_chunks
        if chunks < 1 or args.eval_batch % chunks or chunks % world:
            print(f"the evaluation needs --eval-batch ({args.eval_batch}) a "
                  f"multiple of its calls ({chunks}), and those a multiple of "
                  f"the ranks ({world})")
            return 2
        eval_loss = evaluate(model, args, device, chunks)
        say(f"evaluation loss {eval_loss:.6f} ({args.eval_batch} sequences "
            f"in {chunks} calls)")
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / f"rank{rank}.pt")
            if rank == 0:
                (out / "eval.json").write_text(json.dumps(
                    {"eval_loss": eval_loss, "chunks": chunks,
                     "world_size": world}, indent=1) + "\n")
            say(f"saved {world} rank file(s) and eval.json in {out}")
        if expected:
            diff = abs(eval_loss - expected["eval_loss"]) / abs(
                expected["eval_loss"])
            tolerance = args.tolerance or (1e-5 if dtype == torch.float32
                                           else 2e-2)
            if diff > tolerance:
                say(f"FAILED: the evaluation loss {eval_loss:.6f} differs "
                    f"from {args.expect}'s {expected['eval_loss']:.6f} by "
                    f"{diff:.1e} (relative) > {tolerance}")
                return 1
            say(f"the evaluation loss equals {args.expect}'s (saved on "
                f"{expected['world_size']} rank(s)) within {diff:.1e}")
    if not losses:
        return 0
    if args.check:
        print(f"the plain PyTorch layers agreed at {args.steps - ties} of "
              f"{args.steps} steps (largest relative difference "
              f"{worst[0]:.1e}, of {worst[1]}; tolerance {tolerance}); "
              f"{ties} step(s) excused by a routing near-tie")
        if ties > max(1, args.steps // 10):
            print("FAILED: too many near-ties to trust the comparison")
            return 1
        if drop < args.min_drop:
            print(f"FAILED: the loss fell by {100 * drop:.1f}%, less than "
                  f"--min-drop {100 * args.min_drop:.0f}%")
            return 1
        print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
