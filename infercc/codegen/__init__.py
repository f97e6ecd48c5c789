"""Generated-C kernel runtime: the optimized IR becomes one C translation unit per model (jinja2
templates), gcc builds it, ctypes loads it.

Rooms (one concept per module):

* ``kernels/``: C headers, one per op family; ``kernels/api.h`` is the contract between the code
  generator and the kernels (signatures and layouts), ``kernels.h`` includes them all.
* ``packing.py``: weights re-laid at compile time into what each kernel reads (fp32 panels,
  quantized blocks), written into one 64-byte-aligned blob that is memory-mapped at load.
* ``plan.py``: liveness over the emitted steps and the static memory plan: a buffer slot per
  value, shared by values whose lifetimes do not overlap (sizes are known only at run time, so a
  slot's buffer grows to the largest value it held and is kept across runs).
* ``emit.py`` + ``templates/``: IR -> C source, deterministic; model names reach the source only
  as generated identifiers (and sanitized comments).
* ``build.py``: compiler, flags, the build cache in the user cache directory.
* ``library.py``: the loaded shared object and its entry points (zero-copy numpy in and out).

The backend that runs a compiled model on it lives in ``runtime/c_backend.py``.
"""

from .custom import Kernel, register_kernel, unregister_kernel

__all__ = ["Kernel", "register_kernel", "unregister_kernel"]
