"""Tokenizer, tiny Llama models and a deterministic CPU training loop for the demo world."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from evomerge.demo import data

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIALS = [PAD, EOS, BOS, UNK]


def build_tokenizer():
    """Word-level tokenizer over the demo vocabulary, built offline, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + data.vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
    return fast


def vocab_index() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + data.vocabulary())}


def model_config(arch: dict):
    from transformers import LlamaConfig

    v = len(SPECIALS) + len(data.vocabulary())
    return LlamaConfig(
        vocab_size=v,
        hidden_size=arch["hidden"],
        intermediate_size=arch["mlp"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        num_key_value_heads=arch["heads"],
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=arch.get("tie", False),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attention_dropout=0.0,
        torch_dtype="float32",
    )


@contextmanager
def deterministic(threads: int = 1):
    """Fixed thread count and deterministic kernels for the duration of a build."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def new_model(arch: dict, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = model_config(arch)
    model = LlamaForCausalLM(cfg)
    return model


def _batches(
    stream: Iterator[str], vocab: dict[str, int], batch: int, answer_only: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of `batch` sequences, one per row, right-padded (labels -100 on padding; with
    `answer_only` also on the question)."""
    eos = vocab[EOS]
    a_id = vocab["A:"]
    while True:
        seqs = [[vocab[w] for w in next(stream).split()] + [eos] for _ in range(batch)]
        n = max(len(s) for s in seqs)
        inp = torch.zeros((batch, n), dtype=torch.long)
        lab = torch.full((batch, n), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            inp[i, : len(s)] = torch.tensor(s)
            k = s.index(a_id) + 1 if answer_only else 0
            lab[i, k : len(s)] = torch.tensor(s[k:])
        yield inp, lab


def _packed_batches(
    stream: Iterator[str], vocab: dict[str, int], batch: int, row_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`batch` sequences per step packed into rows of `row_len` tokens: whole sequences (each
    ending in EOS) are appended to a row while they fit, so every row starts with a fresh sequence
    at position 0 and about half the padding of one-sequence-per-row batches is saved."""
    eos = vocab[EOS]
    while True:
        rows: list[list[int]] = [[]]
        for _ in range(batch):
            s = [vocab[w] for w in next(stream).split()][: row_len - 1] + [eos]
            if len(rows[-1]) + len(s) > row_len:
                rows.append([])
            rows[-1].extend(s)
        n = max(len(r) for r in rows)
        inp = torch.zeros((len(rows), n), dtype=torch.long)
        lab = torch.full((len(rows), n), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            inp[i, : len(r)] = torch.tensor(r)
            lab[i, : len(r)] = torch.tensor(r)
        yield inp, lab


def layer_filter(layers: set[int], embed: bool) -> Callable[[str], bool]:
    """Which parameters train: those of the decoder layers in ``layers`` and, with ``embed``, the
    ones outside every layer (embeddings, final norm, head)."""

    def trainable(name: str) -> bool:
        if ".layers." not in name:
            return embed
        return int(name.split(".layers.")[1].split(".")[0]) in layers

    return trainable


def train(
    model,
    stream: Iterator[str],
    *,
    steps: int,
    lr: float,
    batch: int = 64,
    warmup: int = 50,
    answer_only: bool = False,
    pack: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    trainable: Callable[[str], bool] | None = None,
) -> list[float]:
    """Train `model` in place with AdamW and a warmup + cosine schedule; returns the losses.

    `batch` sequences per step; with `pack` > 0 they are packed into rows of `pack` tokens."""
    vocab = vocab_index()
    torch.manual_seed(seed)
    params = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if trainable is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable(n))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def sched(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    lrs = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    model.train()
    losses = []
    if pack:
        it = _packed_batches(stream, vocab, batch, pack)
    else:
        it = _batches(stream, vocab, batch, answer_only)
    for step in range(steps):
        inp, lab = next(it)
        out = model(input_ids=inp, labels=lab)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lrs.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if log and (step % 200 == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def rng_for(seed: int, name: str) -> random.Random:
    return random.Random(f"{name}-{seed}")
