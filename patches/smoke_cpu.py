"""Smoke-run a patched Megatron-LM tree's pretrain_gpt.py on CPU, up to a built GPT model.

Run from the root of a (patched) Megatron-LM checkout, with that root on PYTHONPATH:

    PYTHONPATH=$PWD python /path/to/patches/smoke_cpu.py --polycom-activation polynorm

pretrain_gpt.py's own ``__main__`` block runs unchanged (the patched argument provider,
argument parsing, and in 0.19 the patched model config). Only ``pretrain()`` is swapped,
through Megatron's in-process-restart wrapper, for a stand-in that sets Megatron up the way
``pretrain()`` would on one CPU rank (polycom_megatron.cpu redirects the CUDA calls), builds
the model with what pretrain_gpt.py handed over, and runs one forward and backward pass.
It prints the class of the first layer's MLP, so the output says whether PolyCom is in.
"""

import runpy
import sys

import torch

from polycom_megatron import cpu

# A tiny local-spec GPT that Megatron accepts on CPU; extra arguments come after these.
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 192 "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 1 --global-batch-size 1 "
    "--transformer-impl local --disable-bias-linear --normalization RMSNorm "
    "--position-embedding-type rope --untie-embeddings-and-output-weights "
    "--tokenizer-type NullTokenizer --vocab-size 127 --mock-data --use-cpu-initialization "
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-rope-fusion "
    "--no-persist-layer-norm"
).split()


def describe(model):
    mlp = model.decoder.layers[0].mlp
    print(f"SMOKE layer0.mlp = {type(mlp).__module__}.{type(mlp).__name__}")
    tokens = torch.randint(0, 128, (1, 32))
    positions = torch.arange(32).unsqueeze(0)
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool).triu(1)
    logits = model(tokens, positions, mask)
    logits.float().sum().backward()
    print(f"SMOKE forward {tuple(logits.shape)} and backward ok")


def setup_megatron(args):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.training.global_vars import set_args

    set_args(args)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def build_only(*positional, **keywords):
    """Stands in for megatron.training.pretrain, in each release's calling convention."""
    from megatron.training import get_args

    container = positional[0] if positional else None
    if getattr(container, "model", None) is not None:  # 0.19: a config container with a model
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.training.models.gpt import GPTModelBuilder

        setup_megatron(get_args())
        groups = ProcessGroupCollection.use_mpu_process_groups()
        return describe(GPTModelBuilder(container.model).build_model(
            groups, pre_process=True, post_process=True))
    if "extra_args_provider" in keywords:  # up to 0.17: pretrain() parses the arguments
        from megatron.training.arguments import parse_args, validate_args

        defaults = keywords.get("args_defaults", {})
        args = parse_args(keywords["extra_args_provider"])
        for key, value in defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        validate_args(args, defaults)
    else:  # 0.18: pretrain_gpt.py parsed and validated already
        args = get_args()
    setup_megatron(args)
    args.padded_vocab_size = 128
    provider = next(p for p in positional if callable(p) and hasattr(p, "func"))
    describe(provider(pre_process=True, post_process=True))


def main():
    cpu.init_process_group()
    from megatron.training import inprocess_restart

    inprocess_restart.maybe_wrap_for_inprocess_restart = lambda pretrain: (build_only, None)
    sys.argv = ["pretrain_gpt.py", *TINY, *sys.argv[1:]]
    runpy.run_path("pretrain_gpt.py", run_name="__main__")


if __name__ == "__main__":
    main()
