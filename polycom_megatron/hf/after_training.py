"""What ``train-cpu`` does after training: export the model and show a greedy sample."""

from __future__ import annotations

import importlib.util

SAMPLE_PROMPT = "The "


def export_and_sample(job, prompt: str = SAMPLE_PROMPT) -> None:
    """Export the run's newest checkpoint to OUTPUT_DIR/hf and print a greedy continuation
    of ``prompt`` from the exported transformers model. Skipped, with a note, without the
    ``hf`` extra."""
    missing = [m for m in ("transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"note: not exporting to transformers ({', '.join(missing)} missing; "
              "pip install 'polycom-megatron[hf]')", flush=True)
        return
    from polycom_megatron.hf import export
    from polycom_megatron.hf.sample import greedy_text

    target = job.output_dir / "hf"
    result = export.export(job.checkpoint_dir, target, overwrite=True)
    print(f"transformers: {result.output_dir} ({result.description})", flush=True)
    print(f"sample:      {prompt!r} -> {greedy_text(target, prompt)!r}", flush=True)
