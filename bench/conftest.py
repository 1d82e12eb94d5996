"""pytest-benchmark suite over the cases of vkernels.bench: ``pytest bench/ --benchmark-only``.

Without a GPU the Triton backend runs through its interpreter, which triton reads when it is first
imported: so it is switched on here, before any bench module imports vkernels.
"""
import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # tiny inputs on a shared machine: intra-op threads only add noise


def pytest_report_header(config):
    import triton

    import vkernels

    if GPU:
        lines = [f"vkernels bench on {torch.cuda.get_device_name()}: issue shapes; pytest-benchmark's stats are "
                 "host time of a synchronised call, extra_info holds CUDA-event (device) times and GB/s"]
    else:
        lines = ["vkernels bench: NO GPU on this machine. Timing the quick CPU cases at small fp32 sizes, the "
                 "Triton backend through its interpreter (TRITON_INTERPRET=1), one thread: not performance numbers"]
    lines.append(f"torch {torch.__version__}, Triton {triton.__version__}")
    lines += [f"vkernels backend {name}: {'available' if s.available else 'UNAVAILABLE'} ({s.reason})"
              for name, s in vkernels.backends().items()]
    return lines
