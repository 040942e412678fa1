"""Training speed and same-budget quality of the hand-defined cells against torch.nn.RNN/GRU/LSTM.

Speed (default): tokens/s of a full training step (embedding -> recurrence -> head -> summed CE ->
backward -> Adam) at H=256, T=128, B=32, for each hand cell and its torch twin, in one process with
the same threads, interleaved round by round so background load hits both alike; the median round
is reported and the ratio hand / torch is the figure (goals: Elman >= 1.0x, GRU and LSTM >= 0.9x).

Quality (`--quality`): the hand Elman and nn.RNN trained the same number of steps on the same data
order with the same optimiser; validation nats/char of both and their difference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rnnserve.trainer import fused
from rnnserve.trainer.data import StreamBatches, Vocab, load_text, split
from rnnserve.trainer.model import ModelConfig, RNNModel
from rnnserve.trainer.train import TrainArgs, clip_gradients, evaluate, lr_factor, sequence_loss

TORCH_RNN = {"elman": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class TorchModel(nn.Module):
    """The same char model with torch's fused recurrence in place of a hand cell (zero initial state)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind, self.hidden = config.cell, config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        self.rnn = TORCH_RNN[config.cell](config.embed_size, config.hidden_size, batch_first=True)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.state_size = config.hidden_size * (2 if config.cell == "lstm" else 1)

    def initial_state(self, batch: int) -> Tensor:
        """Zeros (B, S)."""
        return torch.zeros(batch, self.state_size)

    def forward(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, T), state (B, S) -> logits (B, T, V), state (B, S)."""
        x = self.embed(tokens)  # (B, T, E)
        if self.kind == "lstm":
            h0, c0 = state[:, : self.hidden], state[:, self.hidden :]
            hs, (h, c) = self.rnn(x, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
            return self.head(hs), torch.cat([h[0], c[0]], dim=1)
        hs, h = self.rnn(x, state.unsqueeze(0).contiguous())  # (B, T, H)
        return self.head(hs), h[0]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, state: Tensor,
               clip: float = 1.0) -> Tensor:
    """One TBPTT step as rnn-train does it; returns the detached final state."""
    logits, state = model(x, state)  # (B, T, V)
    loss = sequence_loss(logits, y) / y.numel()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients([p for p in model.parameters()], clip)
    opt.step()
    return state.detach()


def speed(args: argparse.Namespace) -> dict:
    """Interleaved tokens/s of hand vs torch for each cell kind."""
    torch.manual_seed(0)
    B, T, V = args.batch, args.seq_len, 65
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))
    runners = {}
    for kind in args.cells:
        cfg = ModelConfig(vocab_size=V, cell=kind, hidden_size=args.hidden, embed_size=args.embed)
        for name, model in ((f"hand-{kind}", RNNModel(cfg)), (f"torch-{kind}", TorchModel(cfg))):
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            state = model.initial_state(B).clone()
            for _ in range(args.warmup):
                state = train_step(model, opt, x, y, state)
            runners[name] = (model, opt, state)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, (model, opt, state) in runners.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state = train_step(model, opt, x, y, state)
            times[name].append(time.perf_counter() - t0)
    tok = B * T * args.steps
    # The fastest round: the least disturbed by other processes on a shared machine (the median is printed too).
    rates = {k: tok / min(v) for k, v in times.items()}
    medians = {k: tok / statistics.median(v) for k, v in times.items()}
    goals = {"elman": 1.0, "gru": 0.9, "lstm": 0.9}
    out = {"threads": torch.get_num_threads(), "H": args.hidden, "T": T, "B": B, "tokens_per_s": {}}
    print(f"training tokens/s, H={args.hidden} T={T} B={B} E={args.embed}, {torch.get_num_threads()} "
          f"threads, best of {args.rounds} interleaved rounds of {args.steps} steps (median ratio in brackets)")
    for kind in args.cells:
        hand, ref = rates[f"hand-{kind}"], rates[f"torch-{kind}"]
        ratio = hand / ref
        med = medians[f"hand-{kind}"] / medians[f"torch-{kind}"]
        ok = "ok" if ratio >= goals[kind] else "BELOW GOAL"
        print(f"  {kind:6s} hand {hand:9,.0f}  torch {ref:9,.0f}  ratio {ratio:5.2f}x [{med:4.2f}x]  "
              f"(goal >= {goals[kind]:.1f}x: {ok})")
        out["tokens_per_s"][kind] = {"hand": hand, "torch": ref, "ratio": ratio, "median_ratio": med}
    return out


def copy_torch_init(hand: RNNModel, ref: TorchModel) -> None:
    """Start the hand Elman from nn.RNN's initial function: same embedding, head, W_x, W_h, b = b_ih + b_hh."""
    cell = hand.layer_cells[0]
    with torch.no_grad():
        hand.embed.weight.copy_(ref.embed.weight)
        hand.head.weight.copy_(ref.head.weight)
        hand.head.bias.copy_(ref.head.bias)
        cell.w_x.copy_(ref.rnn.weight_ih_l0.t())
        cell.w_h.copy_(ref.rnn.weight_hh_l0.t())
        cell.b.copy_(ref.rnn.bias_ih_l0 + ref.rnn.bias_hh_l0)


def _train_quality(build, cfg: ModelConfig, train_ids, val_ids, args: argparse.Namespace, seed: int) -> dict:
    """Train one model args.q_steps steps on the streams in order; its validation nats/char."""
    sched = TrainArgs(steps=args.q_steps, warmup=args.q_steps // 20)
    torch.manual_seed(seed)
    model = build(cfg)
    if args.init == "same" and isinstance(model, RNNModel):
        torch.manual_seed(seed)
        copy_torch_init(model, TorchModel(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, sched))
    batches = StreamBatches(train_ids, args.batch, args.seq_len)
    state = None
    t0 = time.perf_counter()
    for _ in range(args.q_steps):
        x, y, start = batches.next()
        if start or state is None:
            state = model.initial_state(args.batch)
        state = train_step(model, opt, x, y, state)
        lr_sched.step()
    val = evaluate(model, val_ids[: args.val_chars], streams=1)
    return {"val_loss": val, "train_s": time.perf_counter() - t0}


def quality(args: argparse.Namespace) -> dict:
    """Hand Elman vs nn.RNN after the same steps on the same data order, over several seeds."""
    text = load_text(args.data)
    vocab = Vocab.from_text(text)
    train_ids, val_ids = split(vocab.encode(text))
    cfg = ModelConfig(vocab_size=len(vocab), cell="elman", hidden_size=args.hidden, embed_size=args.embed)
    print(f"same budget: {args.q_steps} steps of {args.batch}x{args.seq_len}, H={args.hidden}, Adam cosine "
          f"from {args.lr:g}, clip 1; validation on {args.val_chars} held-out chars from the initial state; "
          f"init: {'the hand cell starts from nn.RNN' + chr(39) + 's initial weights' if args.init == 'same' else 'each its own'}")
    rows = []
    for seed in args.seeds:
        hand = _train_quality(RNNModel, cfg, train_ids, val_ids, args, seed)
        ref = _train_quality(TorchModel, cfg, train_ids, val_ids, args, seed)
        rows.append({"seed": seed, "hand": hand["val_loss"], "torch": ref["val_loss"]})
        print(f"  seed {seed}: hand-elman {hand['val_loss']:.4f}  nn.RNN {ref['val_loss']:.4f}  "
              f"diff {hand['val_loss'] - ref['val_loss']:+.4f}")
    diff = statistics.mean(r["hand"] - r["torch"] for r in rows)
    print(f"  mean hand - torch = {diff:+.4f} over {len(rows)} seeds "
          f"({'ok: no worse' if diff <= 0 else 'WORSE than nn.RNN'})")
    return {"quality": rows, "mean_diff": diff, "init": args.init}


def main(argv: list[str] | None = None) -> int:
    """Run the speed bench (default) or the quality comparison (--quality)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=["elman", "gru", "lstm"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=1, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-fused", action="store_true",
                   help="the LSTM's element-wise steps as torch ops instead of trainer/fused.c's C loop")
    p.add_argument("--quality", action="store_true", help="run the same-budget quality comparison")
    p.add_argument("--q-steps", type=int, default=300, help="steps for --quality")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init", choices=("same", "own"), default="same",
                   help="--quality: hand Elman starts from nn.RNN's initial weights (same) or its own draw (own)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds for --quality")
    p.add_argument("--val-chars", type=int, default=20000)
    p.add_argument("--data", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    for name in ("hidden", "embed", "batch", "seq_len", "steps", "rounds", "q_steps", "val_chars"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        p.error(f"--warmup and --threads must be >= 0, got {args.warmup}, {args.threads}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    fused.set_enabled(not args.no_fused)
    out = quality(args) if args.quality else speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
