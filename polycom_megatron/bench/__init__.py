"""Benchmarks: layer and model throughput (throughput.py), FLOP counts (flops.py), kernel timings."""


def parse_choices(text, allowed, flag: str):
    """A comma-separated flag value checked against ``allowed`` (None stays None)."""
    if text is None:
        return None
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(
            f"--{flag}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}"
        )
    return items


def resolve_device(text, command: str):
    """``--device`` (default: cuda when available) as a torch.device that exists here."""
    import torch

    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"polycom-megatron {command}: --device {text!r} is not a device; "
                         "use cuda, cuda:N or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"polycom-megatron {command}: --device {device}: only cuda and cpu "
                         "are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"polycom-megatron {command}: --device {device}: CUDA is not "
                             "available here (no GPU, or a CPU-only torch); run it on a GPU "
                             "machine or pass --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SystemExit(f"polycom-megatron {command}: --device {device}: this machine has "
                             f"{count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device
