"""Other runtimes' artifacts of the benchmark models, built from a Hugging Face folder, cached.

onnxruntime-genai models come from its own model builder (``python -m
onnxruntime_genai.models.builder``), fp32 and int4, exactly as its users make them, from any
Hugging Face folder (the benchmark LLaMA's by default, SmolLM2's for the smollm2 case); GGUF files
come from `benchmarks.gguf_export` (F32, then llama.cpp's own quantizer for Q4_0). Why cached
beside the exports: building is minutes of untimed work, and every contender must read the same
weights (``llama_hf`` is checked against the dynamo export when it is made).

Each builder returns ``(path or None, note)``: a contender that cannot be built here is skipped
with the note as its reason, never a crash of the whole case.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.models import CACHE, ensure_hf_folder

GENAI_PRECISIONS = ("fp32", "int4")
#: The builder's int4 defaults for the CPU EP, spelled out so the run records them.
GENAI_INT4_OPTIONS = ("block_size=32", "accuracy_level=4")


def genai_path(precision: str, name: str = "genai") -> Path:
    return CACHE / f"{name}_{precision}"


def ensure_genai(precision: str, source: Path | None = None, name: str = "genai") -> tuple[Path | None, str]:
    """Run onnxruntime-genai's model builder on the Hugging Face folder ``source`` (default: the
    benchmark LLaMA's ``llama_hf``) once, into ``bench_out/models/<name>_<precision>``; its log goes
    to build.log. ``name`` must differ per source: a cached build is reused as it is."""
    target = genai_path(precision, name)
    if (target / "genai_config.json").is_file():
        return target, "cached"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None, "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    source = source or ensure_hf_folder()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(CACHE / "genai_cache")]
    if precision == "int4":
        cmd += ["--extra_options", *GENAI_INT4_OPTIONS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return None, f"onnxruntime-genai model builder failed ({proc.returncode}): {tail}"
    (tmp / "build.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target, "built: " + " ".join(cmd[1:])


def gguf_path(kind: str) -> Path:
    return CACHE / "llama_gguf" / f"model-{kind.lower()}.gguf"


def ensure_gguf(kind: str) -> tuple[Path | None, str]:
    """``F32`` written from ``llama_hf``; ``Q4_0`` quantized from it by llama.cpp (llama-cpp-python)."""
    target = gguf_path(kind)
    if target.is_file():
        return target, "cached"
    from benchmarks import gguf_export

    if kind == "F32":
        return gguf_export.write_f32(ensure_hf_folder(), target), "written by benchmarks.gguf_export"
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python is not installed (its quantizer makes Q4_0)"
    source, note = ensure_gguf("F32")
    if source is None:
        return None, note
    return gguf_export.quantize(source, target, kind), f"llama.cpp llama_model_quantize {kind} from the F32 file"


#: Loads a GGUF with llama.cpp's defaults and evaluates a 32-token batch: argv[1] is the file.
_PROBE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=32, n_threads=1, "
          "verbose=False); llm.eval(list(range(1, 33)))")


def llama_cpp_extra_buffers(model: Path) -> tuple[bool, str]:
    """Whether llama.cpp's extra buffer types (AMX tiles, repacked weights) run on this machine,
    tried in a child process: where the CPU reports AMX but the VM does not let it configure tiles,
    ggml dies of a protection fault in ``ggml_backend_amx_mul_mat`` at the first matmul."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(model)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False, "a probe of llama.cpp's default buffers timed out: running without extra buffer types"
    if proc.returncode == 0:
        return True, "llama.cpp's default buffer types (AMX/repacked weights where the CPU has them)"
    return False, (f"llama.cpp's default buffer types crashed a probe here (exit {proc.returncode}; its extra "
                   "buffer types, AMX/repack, fault on this machine): running with use_extra_bufts=False")


def build_all() -> dict[str, tuple[Path | None, str]]:
    """Every artifact the decode case can use, built or explained."""
    out = {f"genai-{p}": ensure_genai(p) for p in GENAI_PRECISIONS}
    if importlib.util.find_spec("llama_cpp") is not None:
        out.update({f"gguf-{k.lower()}": ensure_gguf(k) for k in ("F32", "Q4_0")})
    return out
