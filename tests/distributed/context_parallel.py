"""Run under torchrun with 4 ranks: context parallelism on real process groups (gloo), four checks.

1. cp2 × dp2 (4 replicas in 2 groups of 2) under ZeRO-3 (every block an FSDP unit, its cp ops
   inside): a HF Llama with a padding mask that depends on the input and its own loss (labels)
   trains 3 Adam steps; every step's loss and the final weights equal one device's.
2. cp2 × tp2 with sequence parallelism (Megatron layout), 2 microbatches, the loss on the gathered
   logits outside the model: 3 SGD steps equal one device's, and the forward-only output (with Adam,
   whose steps are about lr whatever the gradient's size, the weights agree within 1.5e-5 and the
   logits within 2.4e-5 after 3 steps: float noise of gradients near 0, as in train_equivalence.py).
3. pp2 × cp2, 1F1B over 2 microbatches (the stages send each other their local positions), the
   padding mask: 3 SGD steps and the forward-only output equal one device's.
4. dropout: a mask on values split over the cp group differs between its ranks, a mask on a value
   whole over it is the same on every rank.

Every rank trains the single-device reference itself (same seed, same data). Prints "OK rank R".

    torchrun --nproc_per_node=4 tests/distributed/context_parallel.py
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import autopart

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from context_models import Dropped  # noqa: E402  (tests/context_models.py)

FWD = dict(rtol=1e-5, atol=1e-5)
WEIGHTS = dict(rtol=1e-5, atol=4e-5)
SEQ = 8


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def train_and_compare(model, batches, kwargs_of, loss_fn, targets, optimizer: str, forward: bool = True,
                      **plan) -> str:
    reference = copy.deepcopy(model)
    compiled = autopart.compile(model, 4, example_inputs=(batches[0],), example_kwargs=kwargs_of(0),
                                optimizer=optimizer, **plan)
    assert compiled.plan.mesh.cp == plan["context_parallel"], compiled.plan.mesh
    runner = compiled.distributed(timeout_s=120)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}
    step_with, ref_optimizer = make[optimizer](runner.parameters()), make[optimizer](reference.parameters())
    for step, ids in enumerate(batches):
        step_with.zero_grad()
        loss = runner.step(ids, target=targets[step], loss_fn=loss_fn, **kwargs_of(step))
        step_with.step()
        ref_optimizer.zero_grad()
        ref_loss = loss_fn(reference(ids, **kwargs_of(step)), targets[step])
        ref_loss.backward()
        ref_optimizer.step()
        torch.testing.assert_close(loss.cpu(), ref_loss.detach(), **FWD)
    full = runner.full_state_dict()
    if runner.rank == 0:
        for name, tensor in reference.named_parameters():
            torch.testing.assert_close(full[name], tensor.detach(), **WEIGHTS, msg=lambda m: f"{name}: {m}")
    if forward:   # inference: every rank returns the batch's output
        with torch.no_grad():
            expected = reference(batches[0], **kwargs_of(0)).logits
        got = runner(batches[0], **kwargs_of(0)).logits
        torch.testing.assert_close(got.cpu(), expected, **FWD)
    return f"{compiled.plan.mesh} loss {loss.item():.6f}"


def check_training() -> list[str]:
    said = []
    batch, steps = 4, 3
    torch.manual_seed(1)
    batches = [torch.randint(0, 64, (batch, SEQ)) for _ in range(steps)]
    masks = [(ids % 5 != 0).long() for ids in batches]   # padding that depends on the tokens
    for mask in masks:
        mask[:, -1] = 1   # every sample keeps a token
    labels = [torch.randint(0, 64, (batch, SEQ)) for _ in range(steps)]

    said.append(train_and_compare(
        llama(), batches, lambda i: {"attention_mask": masks[i], "labels": labels[i]}, lambda out, _: out.loss,
        [None] * steps, "adam", forward=False, data_parallel=4, context_parallel=2, pipeline_parallel=1, tensor_parallel=1,
        num_microbatches=1, data_parallel_mode="zero3"))

    def loss_of_logits(out, target):
        return F.cross_entropy(out.logits.flatten(0, 1), target.flatten())

    megatron = {"model.embed_tokens": "vocab", "model.layers.*.self_attn.[qkv]_proj": "colwise",
                "model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.mlp.gate_proj": "colwise",
                "model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise",
                "lm_head": "colwise"}
    said.append(train_and_compare(
        llama(), batches, lambda i: {}, loss_of_logits, labels, "sgd", data_parallel=2, context_parallel=2,
        pipeline_parallel=1, tensor_parallel=2, sequence_parallel=True, tp_plan=megatron, num_microbatches=2))
    said.append(train_and_compare(
        llama(), batches, lambda i: {"attention_mask": masks[i]}, loss_of_logits, labels, "sgd", data_parallel=2,
        context_parallel=2, pipeline_parallel=2, tensor_parallel=1, num_microbatches=2, schedule="1f1b"))
    return said


def check_dropout() -> str:
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (4, SEQ))
    compiled = autopart.compile(Dropped(), 4, example_inputs=(ids,), data_parallel=4, context_parallel=2,
                                pipeline_parallel=1, tensor_parallel=1, num_microbatches=1)
    runner = compiled.distributed(timeout_s=120)
    group = runner.coords.dp_index // 2     # two cp groups of two replicas, two samples each
    with torch.no_grad():   # this rank's module itself: the whole table as this rank drew it
        _, tokens, table = runner.module(ids[2 * group:2 * group + 2])
    tables = [torch.empty_like(table) for _ in range(4)]
    dist.all_gather(tables, table.contiguous())
    assert torch.equal(tables[0], tables[1]) and torch.equal(tables[2], tables[3]), \
        "the ranks of a cp group drew different masks on a value whole over the group"
    assert not torch.equal(tables[0], tables[2]), "two groups of samples drew the same mask"
    everyone = [torch.empty_like(tokens) for _ in range(4)]
    dist.all_gather(everyone, tokens.contiguous())
    assert torch.equal(everyone[0], everyone[1]) and torch.equal(everyone[2], everyone[3])
    from autopart.core.context_chunks import local_positions

    kept = tokens != 0
    first, second = (kept[:, local_positions(SEQ, 2, r)] for r in range(2))
    assert not torch.equal(first, second), "the ranks of a cp group drew the same mask on their own tokens"
    return f"dropout: {kept.float().mean().item():.2f} of tokens kept, rank masks differ, the whole mask agrees"


def main() -> None:
    said = check_training()
    said.append(check_dropout())
    print(f"OK rank {dist.get_rank()}: " + "; ".join(said), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
