"""``python -m se_fused``: versions, device, and the state of every backend."""
from __future__ import annotations

import platform

import torch

import se_fused
from se_fused.backends import all_statuses


def main() -> None:
    """Print what this installation can do."""
    print(f"se_fused {se_fused.__version__}")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device   {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB)")
    else:
        print(f"device   cpu ({torch.get_num_threads()} threads); no GPU present")
    print("backends:")
    for status in all_statuses():
        state = "usable" if status.usable else ("built, not usable" if status.built else "missing")
        print(f"  {status.name:7s} {state:18s} {status.reason}")
    print(f"available_backends() = {se_fused.available_backends()}")


if __name__ == "__main__":
    main()
