"""Train a few steps through a patched Megatron-LM tree's pretrain_gpt.py, on the CPU.

Run from the root of a (patched) Megatron-LM checkout, with that root on PYTHONPATH:

    PYTHONPATH=$PWD python /path/to/patches/smoke_cpu.py --polycom-activation polynorm

or, for several gloo ranks, ``torchrun --nproc-per-node 2 /path/to/patches/smoke_cpu.py
--tensor-model-parallel-size 2 ...``. pretrain_gpt.py's ``__main__`` runs unchanged: the
patched argument provider, the patched layer spec, Megatron-LM's own ``pretrain()`` with
its mock GPT data. ``polycom_megatron.cpu.enable_megatron_training()`` lets it start without
CUDA, as ``polycom-megatron pretrain --cpu`` does. The hooks print which MLPs PolyCom
replaced; Megatron prints the losses.
"""

import runpy
import sys

from polycom_megatron import cpu

# A tiny local-spec GPT that Megatron accepts on CPU; extra arguments come after these
# (argparse keeps the last value given). 0.15's mock dataset draws token ids up to 4095,
# hence the vocabulary of 4096 (4095 + the NullTokenizer's end-of-document id).
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 192 "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 "
    "--train-iters 4 --lr 1e-3 --lr-decay-style constant --log-interval 1 --eval-iters 1 "
    "--eval-interval 1000 "
    "--transformer-impl local --distributed-backend gloo --disable-bias-linear "
    "--normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --tokenizer-type NullTokenizer --vocab-size 4095 "
    "--mock-data --use-cpu-initialization --no-gradient-accumulation-fusion "
    "--no-masked-softmax-fusion --no-rope-fusion --no-persist-layer-norm "
    "--no-bias-gelu-fusion --no-bias-swiglu-fusion"
).split()


def main():
    cpu.init_process_group()
    cpu.enable_megatron_training()
    sys.argv = ["pretrain_gpt.py", *TINY, *sys.argv[1:]]
    runpy.run_path("pretrain_gpt.py", run_name="__main__")


if __name__ == "__main__":
    main()
