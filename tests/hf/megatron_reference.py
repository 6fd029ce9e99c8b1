"""What the Megatron model itself computes, at a parallel layout: logits on fixed tokens and
a greedy continuation, for comparison with the exported transformers model.

Runs on the gloo ranks of that layout (through ``distributed.run_distributed``). The model
is built at the layout and loaded from the checkpoint by dist_checkpointing; the forward
pass goes through Megatron's pipeline schedule (so PP=2 runs as two stages), and the
vocabulary-sharded logits are gathered over tensor parallelism.

Greedy decoding uses a fixed window (prompt plus new tokens, a multiple of the TP size
so that sequence parallelism can split it): positions after the current one hold token 0
and, attention being causal, cannot change the logits read at the current position.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def _forward_logits(gpt, config, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [batch, seq, vocab] on every rank."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = _causal_mask(s)

    def gather(output):
        group = parallel_state.get_tensor_model_parallel_group()
        size = parallel_state.get_tensor_model_parallel_world_size()
        if size == 1:
            return output.detach().clone()
        parts = [torch.empty_like(output) for _ in range(size)]
        dist.all_gather(parts, output.detach().contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    def forward_step(data_iterator, model):
        next(data_iterator)
        out = model(tokens, position_ids, mask)

        def collect(output_tensor, non_loss_data=False):
            return gather(output_tensor)

        return out, collect

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[gpt],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )
    last = parallel_state.is_pipeline_last_stage()
    holder = [stored[0] if last and stored else None]
    src = dist.get_world_size() - 1  # a rank of the last stage
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def logits_and_greedy(checkpoint_path, model_spec, tp, pp, ep, tokens, prompt, new_tokens):
    """(logits of ``tokens``, ``prompt`` + ``new_tokens`` greedy tokens) from the Megatron
    model at TP x PP x EP loaded from ``checkpoint_path``."""
    from polycom_megatron.hf import megatron_io

    megatron_io.init_layout(tp, pp, ep)
    config = megatron_io.transformer_config(model_spec, tp, pp, ep)
    gpt = megatron_io.build_model(model_spec, config)
    megatron_io.load_weights(gpt, checkpoint_path)
    gpt.eval()
    logits = _forward_logits(gpt, config, tokens)

    window = -(-(len(prompt) + new_tokens) // (2 * tp)) * (2 * tp)
    seq = list(prompt)
    while len(seq) < len(prompt) + new_tokens:
        padded = torch.tensor([seq + [0] * (window - len(seq))])
        step_logits = _forward_logits(gpt, config, padded)
        seq.append(int(step_logits[0, len(seq) - 1].argmax()))
    return logits, seq
